//! The forwarding database: per-network lookup indexes built once from a published
//! [`NetworkTable`], and the per-worker table of learned MAC addresses.
//!
//! [`Index`] is immutable and shared by all workers through an atomic pointer swap; [`Learned`]
//! is owned by one worker and never shared, so neither needs a lock.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::dataplane::{Endpoint, Location, NetworkTable, Tables};
use crate::ethernet::Mac;
use crate::keyring::{Peer, Sessions};
use crate::vxlan::Vni;

/// Lookup indexes for every network of one published [`Tables`].
#[derive(Debug, Default)]
pub struct Index {
    networks: HashMap<Vni, Network>,
}

impl Index {
    /// Builds the indexes. If a VNI appears twice, the first table wins.
    pub fn build(tables: &Tables) -> Index {
        Index::build_sealed(tables, &Sessions::new())
    }

    /// Builds the indexes with the sessions of encrypted networks' peers ([`crate::keyring`]).
    pub fn build_sealed(tables: &Tables, sessions: &Sessions) -> Index {
        let mut networks = HashMap::with_capacity(tables.networks.len());
        for table in &tables.networks {
            networks
                .entry(table.vni)
                .or_insert_with(|| Network::build(table, sessions));
        }
        Index { networks }
    }

    pub fn network(&self, vni: Vni) -> Option<&Network> {
        self.networks.get(&vni)
    }
}

/// What a peer VTEP is to a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// A cluster member: every endpoint behind it is in the tables, so nothing is learned from it
    /// and it may only send from those endpoints' MACs.
    Member,
    /// A static `--vtep` outside the cluster: the hosts behind it are learned from its traffic.
    External,
}

/// One network's indexes: endpoints by MAC and by IP, and its peer VTEPs.
#[derive(Debug)]
pub struct Network {
    vni: Vni,
    gateway: Ipv4Addr,
    gateway_mac: Mac,
    by_mac: HashMap<Mac, Endpoint>,
    by_ip: HashMap<Ipv4Addr, Endpoint>,
    /// Members' VTEPs, then external ones: the flood list.
    peers: Vec<SocketAddrV4>,
    /// Peer VTEPs by IP: senders are checked by address only, because the kernel's VXLAN
    /// device sends from a hashed source port.
    peer_by_ip: HashMap<Ipv4Addr, (SocketAddrV4, PeerKind)>,
    /// An encrypted network: nothing leaves or is taken unsealed.
    sealed: bool,
    /// An encrypted network's sessions with its peers, by VTEP IP.
    keys: HashMap<Ipv4Addr, Arc<Peer>>,
}

impl Network {
    /// Builds the indexes of one network. For duplicate MACs or IPs the first endpoint wins;
    /// duplicate peers are sent to once, and a VTEP listed both as a member and as external
    /// counts as a member.
    pub fn build(table: &NetworkTable, sessions: &Sessions) -> Network {
        let mut by_mac = HashMap::with_capacity(table.endpoints.len());
        let mut by_ip = HashMap::with_capacity(table.endpoints.len());
        for ep in &table.endpoints {
            by_mac.entry(ep.mac).or_insert(*ep);
            by_ip.entry(ep.ip).or_insert(*ep);
        }
        let listed = table.peers.len() + table.external.len();
        let mut peers = Vec::with_capacity(listed);
        let mut peer_by_ip = HashMap::with_capacity(listed);
        let members = table.peers.iter().map(|p| (*p, PeerKind::Member));
        let external = table.external.iter().map(|p| (*p, PeerKind::External));
        for (peer, kind) in members.chain(external) {
            if !peers.contains(&peer) {
                peers.push(peer);
            }
            peer_by_ip.entry(*peer.ip()).or_insert((peer, kind));
        }
        let keys = match &table.sealing {
            Some(sealing) => sealing
                .peers
                .iter()
                .filter_map(|p| Some((p.vtep, sessions.get(&(table.vni, p.vtep))?.clone())))
                .collect(),
            None => HashMap::new(),
        };
        Network {
            vni: table.vni,
            gateway: table.gateway,
            gateway_mac: table.gateway_mac,
            by_mac,
            by_ip,
            peers,
            peer_by_ip,
            sealed: table.sealing.is_some(),
            keys,
        }
    }

    pub fn vni(&self) -> Vni {
        self.vni
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn gateway_mac(&self) -> Mac {
        self.gateway_mac
    }

    /// Where a cluster endpoint with this MAC lives, if it is one.
    pub fn location(&self, mac: Mac) -> Option<Location> {
        self.by_mac.get(&mac).map(|ep| ep.location)
    }

    /// The cluster endpoint with this MAC, if any.
    pub fn endpoint_by_mac(&self, mac: Mac) -> Option<&Endpoint> {
        self.by_mac.get(&mac)
    }

    /// The cluster endpoint with this IP, if any (for ARP answers).
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&Endpoint> {
        self.by_ip.get(&ip)
    }

    /// Every other VTEP carrying this network: the flood list.
    pub fn peers(&self) -> &[SocketAddrV4] {
        &self.peers
    }

    /// Whether the network is encrypted: only sealed datagrams leave and are taken.
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    /// The sessions with the peer at this IP on an encrypted network, if it has keys.
    pub fn keys(&self, ip: Ipv4Addr) -> Option<&Peer> {
        self.keys.get(&ip).map(|p| &**p)
    }

    /// The peer VTEP (address to send to) with this IP, and what it is, if it is one.
    pub fn peer(&self, ip: Ipv4Addr) -> Option<(SocketAddrV4, PeerKind)> {
        self.peer_by_ip.get(&ip).copied()
    }
}

/// How long a learned MAC stays valid without traffic (the Linux bridge default).
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Default bound on learned entries per worker.
pub const DEFAULT_CAPACITY: usize = 4096;

/// MAC addresses learned from decapsulated traffic of external VTEPs: inner source MAC ->
/// sender VTEP IP.
///
/// Used for hosts behind peers that are not in cluster state (for example the kernel's own
/// VXLAN device). Bounded, and kept in the order entries were last learned, so when full the
/// least recently seen entry goes in O(1): a flood of new source MACs costs the same per
/// frame however full the table is. An entry that ages out is also the least recently seen,
/// so it goes first. Once full, an evicted entry's memory is reused: learning does not
/// allocate per packet.
#[derive(Debug)]
pub struct Learned {
    entries: LruCache<(Vni, Mac), Entry>,
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
        Learned {
            entries: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The VTEP IP behind which `mac` was last seen, unless that is older than [`MAX_AGE`].
    /// A lookup does not refresh the entry: only traffic from the MAC does.
    pub fn lookup(&self, vni: Vni, mac: Mac, now: Instant) -> Option<Ipv4Addr> {
        let entry = self.entries.peek(&(vni, mac))?;
        (now.saturating_duration_since(entry.seen) < MAX_AGE).then_some(entry.vtep)
    }

    /// Records that `mac` on `vni` was seen behind `vtep` at `now`, evicting the least
    /// recently seen entry if the table is full.
    pub fn learn(&mut self, vni: Vni, mac: Mac, vtep: Ipv4Addr, now: Instant) {
        self.entries.put((vni, mac), Entry { vtep, seen: now });
    }

    /// Forgets everything learned on a network (it was removed).
    pub fn forget(&mut self, vni: Vni) {
        let gone: Vec<(Vni, Mac)> = self
            .entries
            .iter()
            .filter(|((v, _), _)| *v == vni)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.entries.pop(&key);
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

    pub const GATEWAY_MAC: Mac = Mac([0x02, 0x4f, 0x56, 0, 0x10, 0]);

    /// Network 4096: gateway .1, local endpoint .5, remote endpoint .9 on node .2,
    /// member peer node .2 and an external kernel VTEP .3.
    pub fn table() -> NetworkTable {
        NetworkTable {
            vni: vni(4096),
            gateway: Ipv4Addr::new(198, 19, 0, 1),
            gateway_mac: GATEWAY_MAC,
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
            peers: vec![vtep(2)],
            external: vec![vtep(3), vtep(3), vtep(2)],
            sealing: None,
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
        assert_eq!(
            net.endpoint_by_mac(mac(9)).unwrap().ip,
            Ipv4Addr::new(198, 19, 0, 9)
        );
        assert_eq!(net.gateway_mac(), GATEWAY_MAC);
        assert_eq!(net.peers(), &[vtep(2), vtep(3)]);
        assert_eq!(
            net.peer(Ipv4Addr::new(198, 18, 0, 3)),
            Some((vtep(3), PeerKind::External))
        );
        assert_eq!(net.peer(Ipv4Addr::new(198, 18, 0, 4)), None);
        // Listed both ways, a member counts as a member.
        assert_eq!(
            net.peer(Ipv4Addr::new(198, 18, 0, 2)),
            Some((vtep(2), PeerKind::Member))
        );
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

    proptest::proptest! {
        /// Against a model (a list in order of last learning): the table holds exactly the
        /// `capacity` most recently learned MACs, each with its latest VTEP.
        #[test]
        fn learned_keeps_the_most_recently_seen(
            capacity in 1usize..8,
            ops in proptest::collection::vec((0u8..16, 0u8..4), 0..64),
        ) {
            let t0 = Instant::now();
            let mut learned = Learned::with_capacity(capacity);
            let mut model: Vec<(u8, u8)> = Vec::new();
            for (i, &(m, v)) in ops.iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                learned.learn(vni(1), mac(m), Ipv4Addr::new(198, 18, 0, v), now);
                model.retain(|&(mm, _)| mm != m);
                model.push((m, v));
                if model.len() > capacity {
                    model.remove(0);
                }
            }
            let now = t0 + Duration::from_secs(1);
            proptest::prop_assert_eq!(learned.len(), model.len());
            for m in 0..16u8 {
                let want = model
                    .iter()
                    .find(|&&(mm, _)| mm == m)
                    .map(|&(_, v)| Ipv4Addr::new(198, 18, 0, v));
                proptest::prop_assert_eq!(learned.lookup(vni(1), mac(m), now), want);
            }
        }
    }
}
