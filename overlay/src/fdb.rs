//! The forwarding database: per-network lookup indexes built once from a published
//! [`NetworkTable`], and the per-worker table of learned MAC addresses.
//!
//! [`Index`] is immutable and shared by all workers through an atomic pointer swap; [`Learned`]
//! is owned by one worker and never shared, so neither needs a lock.

use std::collections::{HashMap, hash_map::Entry as MapEntry};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::dataplane::{Endpoint, Location, NetworkTable, Tables};
use crate::ethernet::Mac;
use crate::vxlan::Vni;

/// Lookup indexes for every network of one published [`Tables`].
#[derive(Debug, Default)]
pub struct Index {
    networks: HashMap<Vni, Network>,
}

impl Index {
    /// Builds the indexes. If a VNI appears twice, the first table wins.
    pub fn build(tables: &Tables) -> Index {
        let mut networks = HashMap::with_capacity(tables.networks.len());
        for table in &tables.networks {
            networks
                .entry(table.vni)
                .or_insert_with(|| Network::build(table));
        }
        Index { networks }
    }

    pub fn network(&self, vni: Vni) -> Option<&Network> {
        self.networks.get(&vni)
    }
}

/// One network's indexes: endpoints by MAC and by IP, and its peer VTEPs.
#[derive(Debug)]
pub struct Network {
    vni: Vni,
    gateway: Ipv4Addr,
    by_mac: HashMap<Mac, Location>,
    by_ip: HashMap<Ipv4Addr, Endpoint>,
    peers: Vec<SocketAddrV4>,
    /// Peer VTEPs by IP: senders are checked by address only, because the kernel's VXLAN
    /// device sends from a hashed source port.
    peer_by_ip: HashMap<Ipv4Addr, SocketAddrV4>,
}

impl Network {
    /// Builds the indexes of one network. For duplicate MACs or IPs the first endpoint wins;
    /// duplicate peers are sent to once.
    pub fn build(table: &NetworkTable) -> Network {
        let mut by_mac = HashMap::with_capacity(table.endpoints.len());
        let mut by_ip = HashMap::with_capacity(table.endpoints.len());
        for ep in &table.endpoints {
            by_mac.entry(ep.mac).or_insert(ep.location);
            by_ip.entry(ep.ip).or_insert(*ep);
        }
        let mut peers = Vec::with_capacity(table.peers.len());
        let mut peer_by_ip = HashMap::with_capacity(table.peers.len());
        for &peer in &table.peers {
            if !peers.contains(&peer) {
                peers.push(peer);
            }
            peer_by_ip.entry(*peer.ip()).or_insert(peer);
        }
        Network {
            vni: table.vni,
            gateway: table.gateway,
            by_mac,
            by_ip,
            peers,
            peer_by_ip,
        }
    }

    pub fn vni(&self) -> Vni {
        self.vni
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Where a cluster endpoint with this MAC lives, if it is one.
    pub fn location(&self, mac: Mac) -> Option<Location> {
        self.by_mac.get(&mac).copied()
    }

    /// The cluster endpoint with this IP, if any (for ARP answers).
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&Endpoint> {
        self.by_ip.get(&ip)
    }

    /// Every other VTEP carrying this network: the flood list.
    pub fn peers(&self) -> &[SocketAddrV4] {
        &self.peers
    }

    /// The peer VTEP (address to send to) with this IP, if it is a member.
    pub fn peer(&self, ip: Ipv4Addr) -> Option<SocketAddrV4> {
        self.peer_by_ip.get(&ip).copied()
    }

    pub fn is_peer(&self, ip: Ipv4Addr) -> bool {
        self.peer_by_ip.contains_key(&ip)
    }
}

/// How long a learned MAC stays valid without traffic (the Linux bridge default).
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Default bound on learned entries per worker.
pub const DEFAULT_CAPACITY: usize = 4096;

/// MAC addresses learned from decapsulated traffic: inner source MAC -> sender VTEP IP.
///
/// Used for hosts behind peers that are not in cluster state (for example the kernel's own
/// VXLAN device). Bounded: when full, expired entries go first, then the oldest one. The
/// memory is reserved up front so learning does not allocate per packet.
#[derive(Debug)]
pub struct Learned {
    entries: HashMap<(Vni, Mac), Entry>,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    vtep: Ipv4Addr,
    seen: Instant,
}

impl Default for Learned {
    fn default() -> Self {
        Learned::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Learned {
    pub fn with_capacity(capacity: usize) -> Learned {
        let capacity = capacity.max(1);
        Learned {
            entries: HashMap::with_capacity(capacity),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The VTEP IP behind which `mac` was last seen, unless that is older than [`MAX_AGE`].
    pub fn lookup(&self, vni: Vni, mac: Mac, now: Instant) -> Option<Ipv4Addr> {
        let entry = self.entries.get(&(vni, mac))?;
        (now.saturating_duration_since(entry.seen) < MAX_AGE).then_some(entry.vtep)
    }

    /// Records that `mac` on `vni` was seen behind `vtep` at `now`.
    pub fn learn(&mut self, vni: Vni, mac: Mac, vtep: Ipv4Addr, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&(vni, mac)) {
            self.make_room(now);
        }
        match self.entries.entry((vni, mac)) {
            MapEntry::Occupied(mut e) => *e.get_mut() = Entry { vtep, seen: now },
            MapEntry::Vacant(e) => {
                e.insert(Entry { vtep, seen: now });
            }
        }
    }

    /// Forgets everything learned on a network (it was removed).
    pub fn forget(&mut self, vni: Vni) {
        self.entries.retain(|(v, _), _| *v != vni);
    }

    fn make_room(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.seen) < MAX_AGE);
        if self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.seen)
                .map(|(k, _)| *k);
            if let Some(key) = oldest {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn vni(n: u32) -> Vni {
        Vni::new(n).unwrap()
    }

    pub fn mac(n: u8) -> Mac {
        Mac([0x02, 0x42, 0xc6, 0x13, 0, n])
    }

    pub fn vtep(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, n), 4789)
    }

    /// Network 4096: gateway .1, local endpoint .5, remote endpoint .9 on node .2,
    /// peers node .2 and an external kernel VTEP .3.
    pub fn table() -> NetworkTable {
        NetworkTable {
            vni: vni(4096),
            gateway: Ipv4Addr::new(198, 19, 0, 1),
            endpoints: vec![
                Endpoint {
                    mac: mac(5),
                    ip: Ipv4Addr::new(198, 19, 0, 5),
                    location: Location::Local,
                },
                Endpoint {
                    mac: mac(9),
                    ip: Ipv4Addr::new(198, 19, 0, 9),
                    location: Location::Remote(vtep(2)),
                },
            ],
            peers: vec![vtep(2), vtep(3), vtep(3)],
        }
    }

    #[test]
    fn index_lookups() {
        let index = Index::build(&Tables {
            networks: vec![table()],
        });
        let net = index.network(vni(4096)).unwrap();
        assert!(index.network(vni(1)).is_none());
        assert_eq!(net.location(mac(5)), Some(Location::Local));
        assert_eq!(net.location(mac(9)), Some(Location::Remote(vtep(2))));
        assert_eq!(net.location(mac(7)), None);
        assert_eq!(
            net.endpoint(Ipv4Addr::new(198, 19, 0, 9)).unwrap().mac,
            mac(9)
        );
        assert_eq!(net.peers(), &[vtep(2), vtep(3)]);
        assert!(net.is_peer(Ipv4Addr::new(198, 18, 0, 3)));
        assert!(!net.is_peer(Ipv4Addr::new(198, 18, 0, 4)));
        assert_eq!(net.peer(Ipv4Addr::new(198, 18, 0, 2)), Some(vtep(2)));
    }

    #[test]
    fn learned_ages_and_is_bounded() {
        let t0 = Instant::now();
        let mut learned = Learned::with_capacity(2);
        let ip = |n| Ipv4Addr::new(198, 18, 0, n);
        learned.learn(vni(1), mac(1), ip(3), t0);
        assert_eq!(learned.lookup(vni(1), mac(1), t0), Some(ip(3)));
        assert_eq!(learned.lookup(vni(2), mac(1), t0), None);
        assert_eq!(learned.lookup(vni(1), mac(1), t0 + MAX_AGE), None);

        learned.learn(vni(1), mac(2), ip(3), t0 + Duration::from_secs(1));
        learned.learn(vni(1), mac(3), ip(4), t0 + Duration::from_secs(2));
        assert_eq!(learned.len(), 2);
        // The oldest (mac 1) was evicted.
        assert_eq!(
            learned.lookup(vni(1), mac(1), t0 + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            learned.lookup(vni(1), mac(3), t0 + Duration::from_secs(2)),
            Some(ip(4))
        );

        // A MAC that moves is updated in place.
        learned.learn(vni(1), mac(3), ip(5), t0 + Duration::from_secs(3));
        assert_eq!(
            learned.lookup(vni(1), mac(3), t0 + Duration::from_secs(3)),
            Some(ip(5))
        );
        learned.forget(vni(1));
        assert!(learned.is_empty());
    }
}
