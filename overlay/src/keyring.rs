//! The keys of encrypted networks, as the workers use them: one [`Peer`] per network and peer
//! VTEP, with the [`Sealer`] to send under and the [`Opener`]s to accept.
//!
//! The daemon publishes key material ([`Sealing`]) in the tables; the [`Keyring`] turns it into
//! sessions and keeps them across publishes, so a key still in force keeps its counter and its
//! replay window. Rotation is the daemon publishing the next epoch's keys:
//! - a receiver takes the epoch after its current one already (the daemon publishes that key
//!   too), so peers that learn of a rotation before it lose nothing;
//! - it takes the epoch before its current one for [`GRACE`] after it saw the change, for
//!   datagrams sealed by peers that learn of it later or that were in flight;
//! - the session of the next epoch becomes the current one when it comes, with the window
//!   it has filled.
//!
//! Control path only: [`Keyring::update`] runs when tables are published, never per packet.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dataplane::Tables;
use crate::seal::{self, Key, Opener, Sealer};
use crate::vxlan::Vni;

/// How long the previous epoch's datagrams are accepted after a receiver saw the rotation.
pub const GRACE: Duration = Duration::from_secs(30);

/// What the daemon publishes for an encrypted network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealing {
    /// The key epoch in force; its low 8 bits are the key id on the wire.
    pub epoch: u32,
    /// Keys with every member carrying the network. An external VTEP has none, so nothing is
    /// sent to it and nothing accepted from it.
    pub peers: Vec<PeerKeys>,
}

/// The keys between this node and one peer in [`Sealing::epoch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKeys {
    pub vtep: Ipv4Addr,
    /// This node to the peer, in the epoch.
    pub send: Key,
    /// The peer to this node, in the epoch.
    pub receive: Key,
    /// The peer to this node, in the next epoch.
    pub receive_next: Key,
}

/// One peer's sessions on one network.
#[derive(Debug)]
pub struct Peer {
    pub send: Arc<Sealer>,
    current: (u8, Arc<Opener>),
    next: (u8, Arc<Opener>),
    /// The previous epoch's, and until when it is taken.
    previous: Option<(u8, Arc<Opener>, Instant)>,
}

impl Peer {
    /// The opener for datagrams carrying `key_id`, if that key is taken at `now`.
    pub fn opener(&self, key_id: u8, now: Instant) -> Option<&Opener> {
        if key_id == self.current.0 {
            return Some(&self.current.1);
        }
        if key_id == self.next.0 {
            return Some(&self.next.1);
        }
        match &self.previous {
            Some((id, opener, until)) if *id == key_id && now < *until => Some(opener),
            _ => None,
        }
    }
}

/// The sessions of every encrypted network's peers, by network and peer VTEP IP.
pub type Sessions = HashMap<(Vni, Ipv4Addr), Arc<Peer>>;

/// Sessions kept across publishes.
#[derive(Debug, Default)]
pub struct Keyring {
    sealers: HashMap<Key, Arc<Sealer>>,
    openers: HashMap<Key, Arc<Opener>>,
    /// Each peer's epoch and current receive key, as last published.
    current: HashMap<(Vni, Ipv4Addr), (u32, Key)>,
    previous: HashMap<(Vni, Ipv4Addr), (u8, Arc<Opener>, Instant)>,
}

impl Keyring {
    /// The sessions for `tables` at `now`: those of keys still in force are kept, new keys get
    /// new sessions (a sealer counting from `start`), and a peer whose epoch changed keeps its
    /// old receive session for [`GRACE`]. Everything else is forgotten.
    pub fn update(&mut self, tables: &Tables, now: Instant, start: u64) -> Sessions {
        let mut sealers = HashMap::new();
        let mut openers = HashMap::new();
        let mut current = HashMap::new();
        let mut previous = HashMap::new();
        let mut sessions = Sessions::new();
        for net in &tables.networks {
            let Some(sealing) = &net.sealing else {
                continue;
            };
            let id = sealing.epoch as u8;
            for keys in &sealing.peers {
                let at = (net.vni, keys.vtep);
                let send = take(&mut self.sealers, &mut sealers, &keys.send, || {
                    Sealer::new(&keys.send, id, start)
                });
                let mut open =
                    |key: &Key| take(&mut self.openers, &mut openers, key, || Opener::new(key));
                let (receive, receive_next) = (open(&keys.receive), open(&keys.receive_next));
                let kept = match self.current.get(&at) {
                    Some((epoch, old)) if *epoch != sealing.epoch => self
                        .openers
                        .get(old)
                        .or_else(|| openers.get(old))
                        .map(|o| (*epoch as u8, o.clone(), now + GRACE)),
                    _ => self.previous.remove(&at),
                };
                let kept = kept.filter(|(_, _, until)| now < *until);
                if let Some(p) = &kept {
                    previous.insert(at, p.clone());
                }
                current.insert(at, (sealing.epoch, keys.receive.clone()));
                sessions.insert(
                    at,
                    Arc::new(Peer {
                        send,
                        current: (id, receive),
                        next: (id.wrapping_add(1), receive_next),
                        previous: kept,
                    }),
                );
            }
        }
        *self = Keyring {
            sealers,
            openers,
            current,
            previous,
        };
        sessions
    }
}

/// The session for `key`: the one in `old` if there is one, else a new one; recorded in `new`.
fn take<T>(
    old: &mut HashMap<Key, Arc<T>>,
    new: &mut HashMap<Key, Arc<T>>,
    key: &Key,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    let session = new
        .get(key)
        .cloned()
        .or_else(|| old.remove(key))
        .unwrap_or_else(|| Arc::new(make()));
    new.insert(key.clone(), session.clone());
    session
}

/// Seals a copy of `frame` for `peer` into `out`; returns the datagram's length, or `None` if
/// `out` is too short.
pub fn seal_copy(peer: &Peer, vni: Vni, frame: &[u8], out: &mut [u8]) -> Option<usize> {
    let len = seal::HEADER_LEN + frame.len() + seal::TAG_LEN;
    let datagram = out.get_mut(..len)?;
    datagram[seal::HEADER_LEN..len - seal::TAG_LEN].copy_from_slice(frame);
    peer.send.seal(vni, datagram);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::NetworkTable;
    use crate::ethernet::Mac;
    use crate::seal::Header;

    fn tables(epoch: u32) -> Tables {
        let k = |dir: u8, e: u32| {
            Key([
                dir, e as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0,
            ])
        };
        Tables {
            networks: vec![NetworkTable {
                vni: Vni::new(7).unwrap(),
                gateway: Ipv4Addr::new(198, 19, 0, 1),
                gateway_mac: Mac([2, 0, 0, 0, 0, 1]),
                endpoints: vec![],
                peers: vec![],
                external: vec![],
                sealing: Some(Sealing {
                    epoch,
                    peers: vec![PeerKeys {
                        vtep: Ipv4Addr::new(198, 18, 0, 2),
                        send: k(1, epoch),
                        receive: k(2, epoch),
                        receive_next: k(2, epoch + 1),
                    }],
                }),
            }],
        }
    }

    fn peer(s: &Sessions) -> &Peer {
        &s[&(Vni::new(7).unwrap(), Ipv4Addr::new(198, 18, 0, 2))]
    }

    /// A datagram the peer sealed under `key` in epoch `epoch`.
    fn from_peer(epoch: u32, counter: u64) -> Vec<u8> {
        let t = tables(epoch);
        let keys = &t.networks[0].sealing.as_ref().unwrap().peers[0];
        let mut d = vec![0u8; seal::HEADER_LEN + 60 + seal::TAG_LEN];
        Sealer::new(&keys.receive, epoch as u8, counter).seal(Vni::new(7).unwrap(), &mut d);
        d
    }

    fn opens(p: &Peer, d: &[u8], now: Instant) -> bool {
        let mut d = d.to_vec();
        let h = Header::parse(&d).unwrap();
        p.opener(h.key_id, now)
            .is_some_and(|o| o.open(&h, &mut d).is_ok())
    }

    #[test]
    fn sessions_survive_a_republish_and_rotation_keeps_the_old_epoch_for_the_grace() {
        let mut ring = Keyring::default();
        let t0 = Instant::now();
        let s = ring.update(&tables(5), t0, 100);
        assert_eq!(peer(&s).send.reserve(1), 100);
        assert!(opens(peer(&s), &from_peer(5, 1), t0));
        // Republished: the same sealer (the counter goes on) and window (no replay).
        let s = ring.update(&tables(5), t0, 0);
        assert_eq!(peer(&s).send.reserve(1), 101);
        assert!(
            !opens(peer(&s), &from_peer(5, 1), t0),
            "replay after republish"
        );
        // A peer that rotated first is heard before this node learns of it.
        assert!(opens(peer(&s), &from_peer(6, 1), t0));
        let t1 = t0 + Duration::from_secs(1);
        let s = ring.update(&tables(6), t1, 0);
        assert_eq!(peer(&s).send.reserve(1), 0, "a new epoch, a new sealer");
        assert!(
            !opens(peer(&s), &from_peer(6, 1), t1),
            "the next epoch's window came along"
        );
        assert!(opens(peer(&s), &from_peer(6, 2), t1));
        assert!(
            opens(peer(&s), &from_peer(5, 2), t1),
            "the old epoch within the grace"
        );
        assert!(
            !opens(peer(&s), &from_peer(5, 1), t1),
            "and its window came along"
        );
        let late = t1 + GRACE;
        assert!(
            !opens(peer(&s), &from_peer(5, 3), late),
            "not after the grace"
        );
        let s = ring.update(&tables(6), late, 0);
        assert!(
            !opens(peer(&s), &from_peer(5, 4), t1),
            "expired entries are forgotten"
        );
        assert!(!opens(peer(&s), &from_peer(8, 1), t1), "two epochs ahead");
    }
}
