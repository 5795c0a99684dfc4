//! Traffic counters per network and per peer, for metrics: written by the workers with relaxed
//! atomics, read (summed) when someone asks, never locked on the data path.
//!
//! A network's counters are per worker (each worker owns its TAP queue's), so no two workers
//! write one cache line. A peer's are shared by the workers: they are touched once per
//! received message (a `UDP_GRO` batch counts its datagrams at once), and found through a map
//! the control side swaps in whole when the tables change, so a datagram from an address that
//! is no peer adds no entry.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::switch::DropReason;

pub(crate) const DROP_REASONS: usize = DropReason::ALL.len();

/// One worker's counters of one network. "In" is what containers on this node sent (read from
/// the TAP), "out" what was delivered to them (written to the TAP); a TSO or coalesced
/// super-frame counts as one frame.
#[derive(Debug, Default)]
pub(crate) struct NetCounters {
    in_frames: AtomicU64,
    in_bytes: AtomicU64,
    out_frames: AtomicU64,
    out_bytes: AtomicU64,
    drops: [AtomicU64; DROP_REASONS],
}

impl NetCounters {
    pub(crate) fn read_frame(&self, bytes: usize) {
        self.in_frames.fetch_add(1, Relaxed);
        self.in_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn wrote_frame(&self, bytes: usize) {
        self.out_frames.fetch_add(1, Relaxed);
        self.out_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Relaxed);
    }
}

/// A network's traffic since it was added on this node, all workers together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkTraffic {
    pub in_frames: u64,
    pub in_bytes: u64,
    pub out_frames: u64,
    pub out_bytes: u64,
    /// Frames of this network dropped, by reason; reasons never seen are absent. Datagrams
    /// dropped before their network is known (a bad header, a stranger) count only in the
    /// node's [`crate::Stats::drops`].
    pub drops: BTreeMap<&'static str, u64>,
}

impl NetworkTraffic {
    pub(crate) fn sum(counters: &[Arc<NetCounters>]) -> NetworkTraffic {
        let mut t = NetworkTraffic::default();
        for c in counters {
            t.in_frames += c.in_frames.load(Relaxed);
            t.in_bytes += c.in_bytes.load(Relaxed);
            t.out_frames += c.out_frames.load(Relaxed);
            t.out_bytes += c.out_bytes.load(Relaxed);
            add_drops(&mut t.drops, &c.drops);
        }
        t
    }
}

/// Adds the counts of `drops` (by [`DropReason::index`]) to `sum` under their names, leaving
/// out reasons never seen.
pub(crate) fn add_drops(sum: &mut BTreeMap<&'static str, u64>, drops: &[AtomicU64; DROP_REASONS]) {
    for reason in DropReason::ALL {
        let n = drops[reason.index()].load(Relaxed);
        if n > 0 {
            *sum.entry(reason.as_str()).or_default() += n;
        }
    }
}

/// One peer's counters, shared by the workers.
#[derive(Debug, Default)]
pub(crate) struct PeerCounters {
    datagrams: AtomicU64,
    /// When a datagram from it was last taken: nanoseconds after [`Peers::epoch`], plus one
    /// (0: never).
    last_seen: AtomicU64,
}

/// The peers of every network, each with its counters.
#[derive(Debug)]
pub(crate) struct Peers {
    epoch: Instant,
    by_ip: HashMap<Ipv4Addr, Arc<PeerCounters>>,
}

impl Peers {
    pub(crate) fn new(epoch: Instant) -> Peers {
        Peers {
            epoch,
            by_ip: HashMap::new(),
        }
    }

    /// The map for the peers `ips`, keeping the counters of those this one has.
    pub(crate) fn follow(&self, ips: impl Iterator<Item = Ipv4Addr>) -> Peers {
        Peers {
            epoch: self.epoch,
            by_ip: ips
                .map(|ip| (ip, self.by_ip.get(&ip).cloned().unwrap_or_default()))
                .collect(),
        }
    }

    /// Counts `datagrams` taken from `ip` at `now`; nothing if `ip` is no peer.
    pub(crate) fn took(&self, ip: Ipv4Addr, datagrams: u64, now: Instant) {
        if let Some(c) = self.by_ip.get(&ip) {
            c.datagrams.fetch_add(datagrams, Relaxed);
            let at = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
                .unwrap_or(u64::MAX - 1);
            c.last_seen.fetch_max(at + 1, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<Ipv4Addr, PeerTraffic> {
        self.by_ip
            .iter()
            .map(|(&ip, c)| {
                let seen = c.last_seen.load(Relaxed);
                let traffic = PeerTraffic {
                    datagrams: c.datagrams.load(Relaxed),
                    last_seen: (seen > 0).then(|| self.epoch + Duration::from_nanos(seen - 1)),
                };
                (ip, traffic)
            })
            .collect()
    }
}

/// VXLAN from one peer since this node first had it as a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerTraffic {
    /// Datagrams taken from it (checked, and opened if sealed).
    pub datagrams: u64,
    /// When the last one was taken.
    pub last_seen: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_counts_survive_a_new_map_and_strangers_are_not_counted() {
        let t0 = Instant::now();
        let (a, b) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        let peers = Peers::new(t0).follow([a].into_iter());
        peers.took(a, 3, t0 + Duration::from_millis(5));
        peers.took(b, 7, t0);
        let next = peers.follow([a, b].into_iter());
        next.took(a, 1, t0 + Duration::from_millis(2));
        let seen = next.snapshot();
        assert_eq!(seen[&a].datagrams, 4);
        assert_eq!(seen[&a].last_seen, Some(t0 + Duration::from_millis(5)));
        assert_eq!(seen[&b].datagrams, 0);
        assert_eq!(seen[&b].last_seen, None);
    }

    #[test]
    fn a_networks_workers_are_summed() {
        let counters: Vec<Arc<NetCounters>> = (0..2).map(|_| Arc::default()).collect();
        counters[0].read_frame(100);
        counters[1].read_frame(60);
        counters[1].wrote_frame(40);
        counters[0].dropped(DropReason::ArpSpoof);
        counters[1].dropped(DropReason::ArpSpoof);
        let t = NetworkTraffic::sum(&counters);
        assert_eq!(
            (t.in_frames, t.in_bytes, t.out_frames, t.out_bytes),
            (2, 160, 1, 40)
        );
        assert_eq!(t.drops.get("arp-spoof"), Some(&2));
        assert_eq!(t.drops.len(), 1);
    }
}
