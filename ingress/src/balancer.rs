//! The load balancer: what the data path calls for a frame to a VIP, and for a frame that may
//! be the reply of a balanced flow. It ties the [`service`] snapshot, [`conntrack`] and
//! [`nat`] together.
//!
//! # Both directions of a flow, from any worker
//! A flow's first packet and its replies can be read by different data-path workers: the TAP
//! picks a queue by CPU or by the kernel's hash of the tuple it sees (the VIP), and the reply
//! arrives over VXLAN on whichever socket the sending node's hash picked (the task). No
//! steering can put both on one worker before NAT has run. So the connection table is shared
//! by all workers, in [`SHARDS`] shards, each one [`conntrack::Table`] behind its own mutex:
//! no global lock, and two workers contend only on flows of one shard.
//!
//! A flow lives in the shard of its **client port**. Every packet of the flow carries that
//! port: as its source on the way in (client -> VIP:port), as its destination on the way back
//! (task -> client, or task -> VIP:client port in the hairpin case, where the source is
//! rewritten but the port kept). So a packet is looked up in the shard of its source port and
//! then of its destination port. A packet to a VIP is looked up in its source port's shard, a
//! packet from a task in its destination port's, and only a task calling its own VIP in both;
//! other traffic takes no lock.
//!
//! Nothing allocates per packet: a shard's table is allocated whole (at its full capacity) by
//! the first flow that lands in it, so a node that balances nothing holds no table at all, and
//! the snapshot is swapped whole.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use packet::checksum::Mode;

use crate::conntrack::{self, Direction, Entry, Nat};
use crate::service::Table;
use crate::{Protocol, nat, reject};

/// Shards of the connection table.
pub const SHARDS: usize = 64;

/// What to do with a frame; the data path maps it to its own verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a balanced flow: leave the frame alone.
    Pass,
    /// Rewritten in place: switch it by its new destination MAC.
    Rewritten,
    /// Send the frame of this length in the reply buffer back to the sender (a reset, or a
    /// port unreachable): the flow has no task to go to.
    Reply(usize),
    /// Drop it (counted in [`Stats`]).
    Drop,
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
    shards: Box<[Mutex<Option<conntrack::Table>>]>,
    per_shard: u32,
    timeouts: conntrack::Timeouts,
    /// The MAC of an overlay address (the cluster's convention), for the rewritten frames.
    mac_of: fn(Ipv4Addr) -> [u8; 6],
    pub stats: Stats,
}

impl Balancer {
    /// A balancer tracking up to `flows` flows (split over the shards), with no services.
    pub fn new(
        flows: u32,
        timeouts: conntrack::Timeouts,
        mac_of: fn(Ipv4Addr) -> [u8; 6],
    ) -> Result<Balancer, conntrack::Error> {
        let per_shard = flows.div_ceil(SHARDS as u32).max(1);
        // Refused now rather than at the first flow.
        conntrack::Table::new(per_shard, timeouts)?;
        Ok(Balancer {
            services: ArcSwap::from_pointee(Table::default()),
            shards: (0..SHARDS).map(|_| Mutex::new(None)).collect(),
            per_shard,
            timeouts,
            mac_of,
            stats: Stats::default(),
        })
    }

    /// Swaps in a new snapshot. Flows to tasks that left it (or went down) are marked, so
    /// their next packet is answered with a reset instead of vanishing.
    pub fn publish(&self, next: Table, now: Instant) {
        let gone = self.services.load().removed_backends(&next);
        self.services.store(Arc::new(next));
        for task in gone {
            for shard in self.shards.iter() {
                if let Some(table) = lock(shard).as_mut() {
                    table.remove_backend(now, task);
                }
            }
        }
    }

    /// Expires flows whose time is up.
    pub fn handle_timeout(&self, now: Instant) {
        for shard in self.shards.iter() {
            if let Some(table) = lock(shard).as_mut() {
                table.handle_timeout(now);
            }
        }
    }

    /// Flows tracked now, and flows evicted since start to make room for new ones (a full
    /// table evicts unanswered flows first, and keeps forwarding).
    pub fn flows(&self) -> (usize, u64) {
        self.shards
            .iter()
            .fold((0, 0), |(tracked, evicted), shard| {
                match lock(shard).as_ref() {
                    Some(table) => {
                        let stats = table.stats();
                        (
                            tracked + table.len(),
                            evicted + stats.evicted_embryonic + stats.evicted_oldest,
                        )
                    }
                    None => (tracked, evicted),
                }
            })
    }

    /// Looks at an Ethernet frame sent to a VIP, or on its way to a local endpoint; `mode`
    /// says whether its TCP/UDP checksum is complete or an offloaded frame's partial sum. A
    /// reset or port unreachable is built into `reply`.
    pub fn process(&self, frame: &mut [u8], mode: Mode, now: Instant, reply: &mut [u8]) -> Verdict {
        let services = self.services.load();
        // Most frames of a network without services: no parsing at all.
        if services.is_empty() {
            return Verdict::Pass;
        }
        let Ok(tuple) = nat::flow(frame) else {
            return Verdict::Pass;
        };
        let to_vip = services.service_for(*tuple.dst.ip());
        if to_vip.is_none() && !services.is_backend(*tuple.src.ip()) {
            return Verdict::Pass;
        }
        let flags = nat::tcp_flags(frame);
        // The client port is the source on the way in (to a VIP), the destination on the way
        // back (from a task); a task calling its own VIP is both, so both shards are asked.
        let from_task = services.is_backend(*tuple.src.ip());
        let mut shards = [
            to_vip
                .is_some()
                .then(|| self.shard(tuple.src.port()))
                .flatten(),
            from_task.then(|| self.shard(tuple.dst.port())).flatten(),
        ];
        if shards[0] == shards[1] {
            shards[1] = None;
        }
        for shard in shards.into_iter().flatten() {
            let tracked = lock(&self.shards[shard])
                .as_mut()
                .and_then(|table| table.track(now, &tuple, flags));
            if let Some((direction, entry)) = tracked {
                return self.follow(frame, mode, direction, &entry, reply);
            }
        }
        let Some(service) = to_vip else {
            return Verdict::Pass;
        };
        let Some(task) = service.pick(tuple.stable_hash()) else {
            return self.reject(frame, tuple.proto, reply);
        };
        let client = tuple.src;
        let nat = Nat {
            backend: SocketAddrV4::new(task.addr, tuple.dst.port()),
            // A task reaching its own service: give it a source that is not its own.
            source: (task.addr == *client.ip())
                .then(|| SocketAddrV4::new(*tuple.dst.ip(), client.port())),
        };
        let Some(shard) = self.shard(client.port()) else {
            return self.count_drop();
        };
        let mut table = lock(&self.shards[shard]);
        let table = match table.as_mut() {
            Some(table) => table,
            None => match conntrack::Table::new(self.per_shard, self.timeouts) {
                Ok(made) => table.insert(made),
                Err(_) => return self.count_drop(),
            },
        };
        match table.insert(now, tuple, nat, flags) {
            Ok(entry) => {
                self.stats.flows.fetch_add(1, Ordering::Relaxed);
                self.follow(frame, mode, Direction::Original, &entry, reply)
            }
            // Another worker tracked this flow's first packet (a retransmitted SYN) between our
            // lookup and this insert: follow its entry.
            Err(conntrack::Error::Exists(_)) => match table.track(now, &tuple, flags) {
                Some((direction, entry)) => self.follow(frame, mode, direction, &entry, reply),
                None => self.count_drop(),
            },
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
        let original = entry.original();
        let nat = entry.nat();
        if entry.is_backend_gone() {
            return match direction {
                Direction::Original => self.reject(frame, original.proto, reply),
                Direction::Reply => self.count_drop(),
            };
        }
        let rewritten = match direction {
            // client -> VIP:port becomes (source) -> task:port.
            Direction::Original => {
                nat::rewrite_dst(frame, *nat.backend.ip(), nat.backend.port(), mode)
                    .and_then(|()| match nat.source {
                        Some(s) => nat::rewrite_src(frame, *s.ip(), s.port(), mode),
                        None => Ok(()),
                    })
                    .map(|()| {
                        let vip_mac = nat.source.map(|_| (self.mac_of)(*original.dst.ip()));
                        nat::set_macs(frame, Some((self.mac_of)(*nat.backend.ip())), vip_mac);
                    })
            }
            // task:port -> client (or -> the rewritten source) becomes VIP:port -> client.
            Direction::Reply => {
                nat::rewrite_src(frame, *original.dst.ip(), original.dst.port(), mode)
                    .and_then(|()| match nat.source {
                        Some(_) => {
                            nat::rewrite_dst(frame, *original.src.ip(), original.src.port(), mode)
                        }
                        None => Ok(()),
                    })
                    .map(|()| {
                        let client_mac = nat.source.map(|_| (self.mac_of)(*original.src.ip()));
                        nat::set_macs(frame, client_mac, Some((self.mac_of)(*original.dst.ip())));
                    })
            }
        };
        match rewritten {
            Ok(()) => Verdict::Rewritten,
            Err(_) => self.count_drop(),
        }
    }

    fn reject(&self, frame: &[u8], proto: Protocol, reply: &mut [u8]) -> Verdict {
        let built = match proto {
            Protocol::Tcp => reject::tcp_reset(frame, reply),
            Protocol::Udp => reject::port_unreachable(frame, reply),
        };
        match built {
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

/// The shard's table. A worker that panicked while holding it left it consistent (every
/// change is made in one call that does not unwind halfway), so it is used as it is.
fn lock(shard: &Mutex<Option<conntrack::Table>>) -> MutexGuard<'_, Option<conntrack::Table>> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Backend, Health, Spec};
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
        let b = Balancer::new(1024, conntrack::Timeouts::default(), mac_of).unwrap();
        b.publish(table(tasks), Instant::now());
        b
    }

    fn table(tasks: &[u8]) -> Table {
        let backends = tasks
            .iter()
            .map(|&t| Backend {
                addr: ip(t),
                node: Ipv4Addr::new(198, 18, 0, 1),
                health: Health::Healthy,
            })
            .collect();
        let spec = Spec {
            name: "web".into(),
            vip: Vip(ip(VIP).into()),
            backends,
        };
        Table::build(maglev::Size::new(251).unwrap(), [spec]).unwrap()
    }

    fn tcp(from: (u8, u16), to: (u8, u16), syn: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(mac_of(ip(from.0)), mac_of(ip(to.0)))
            .ipv4(ip(from.0).octets(), ip(to.0).octets(), 64)
            .tcp(from.1, to.1, 1, 512);
        if syn {
            b = b.syn();
        } else {
            b = b.ack(1);
        }
        let mut f = Vec::new();
        b.write(&mut f, b"x").unwrap();
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
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!("not TCP")
        };
        assert_eq!(
            t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap(),
            t.checksum()
        );
        let (mut src_mac, mut dst_mac) = ([0; 6], [0; 6]);
        dst_mac.copy_from_slice(&f[..6]);
        src_mac.copy_from_slice(&f[6..12]);
        (
            src_mac,
            dst_mac,
            SocketAddrV4::new(h.source.into(), t.source_port()),
            SocketAddrV4::new(h.destination.into(), t.destination_port()),
        )
    }

    fn run(b: &Balancer, f: &mut [u8]) -> Verdict {
        b.process(f, Mode::Full, Instant::now(), &mut [0u8; 128])
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
            b.process(&mut syn, Mode::Full, Instant::now(), &mut out),
            Verdict::Reply(54)
        ));

        let b = balancer(&[7]);
        let mut first = tcp((5, 40001), (VIP, 80), true);
        assert_eq!(run(&b, &mut first), Verdict::Rewritten);
        b.publish(table(&[]), Instant::now());
        let mut next = tcp((5, 40001), (VIP, 80), false);
        assert!(matches!(
            b.process(&mut next, Mode::Full, Instant::now(), &mut out),
            Verdict::Reply(54)
        ));
        assert_eq!(b.stats.rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn traffic_that_is_not_a_services_passes_untouched() {
        let b = balancer(&[7]);
        let mut plain = tcp((5, 40000), (6, 80), true);
        let before = plain.clone();
        assert_eq!(run(&b, &mut plain), Verdict::Pass);
        assert_eq!(plain, before);
        // From a task, but no tracked flow: its own connection elsewhere.
        let mut own = tcp((7, 80), (6, 5555), false);
        assert_eq!(run(&b, &mut own), Verdict::Pass);
        assert_eq!(b.flows(), (0, 0));
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
