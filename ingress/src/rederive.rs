//! Flows a node picks up mid-stream, after a restart emptied its connection table.
//!
//! A client's packet to a VIP needs nothing: it is balanced again, and Maglev over the same
//! tasks picks the same task on every node, before the restart and after. What nothing
//! answers is a task's packet to its client (task:port -> client) that comes before the
//! client's next one: passed on un-NATed, the client's stack would answer it with a reset to
//! the task. [`answered`] derives the flow such a packet belongs to by the same hashing: the
//! client's flow to the task's VIP (or, for a task that called its own VIP, its own flow) whose
//! Maglev pick is this very task.
//!
//! One packet cannot tell that reply from the reply of a connection the client made to the
//! task's own address (`tasks.NAME`, or the address itself). A wrong guess is refuted by the
//! client's stack: it has no connection from the VIP and answers the rewritten packet with a
//! reset to the VIP. The balancer drops that reset (a reset to a VIP for a flow it does not
//! track has nothing to reset) and remembers the task's tuple in [`Unbalanced`], as it does the
//! tuple of every SYN or SYN-ACK a task sends without a tracked flow: a connection of the
//! task's own, or one to its own address, seen from its start. Their packets then pass
//! untouched; the refuted one is sent again by the task's TCP.
//!
//! UDP is derived too, but only for a while after the balancer starts ([`UDP_AFTER_START`]):
//! a task that streams datagrams to its client (the client sends one and then only listens)
//! would otherwise never be heard again, its datagrams un-NATed and dropped by the client's
//! socket. Nothing refutes a wrong UDP guess (a socket takes or drops a datagram from the wrong
//! source without a word), so the guess is made only while flows may have been lost, and a
//! client's datagram to a task's own address marks the task's answers [`Unbalanced`] then. A
//! derived UDP flow is tracked again (see the balancer), so that it outlives that while.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddrV4;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::balancer::vip_nat;
use crate::conntrack::Nat;
use crate::flow::Tuple;
use crate::service::Table;

/// How long after the balancer starts a task's UDP datagram is taken for a lost flow's: a
/// restarted node knows its services again within seconds, and a streaming task sends many
/// datagrams a second.
pub const UDP_AFTER_START: Duration = Duration::from_secs(60);

/// The flow that `reply`, a TCP or UDP packet from a task that no tracked flow expects,
/// answers: its original tuple (client -> VIP:port) and NAT, as the balancer made them when the
/// flow started. `None` when no service would send such a flow to this task.
pub fn answered(services: &Table, reply: &Tuple) -> Option<(Tuple, Nat)> {
    let task = *reply.src.ip();
    services.services_of(task).find_map(|(vip, service)| {
        // A task that called its own VIP was given the VIP as its source.
        let client = if *reply.dst.ip() == vip {
            SocketAddrV4::new(task, reply.dst.port())
        } else {
            reply.dst
        };
        let original = Tuple::new(
            reply.proto,
            client,
            SocketAddrV4::new(vip, reply.src.port()),
        );
        let picked = service.choose(&original).task?;
        (picked.addr == task).then(|| (original, vip_nat(task, &original)))
    })
}

/// Tasks' tuples (task:port -> client) known to be no balanced flow's, so that their packets
/// pass untouched: a connection to a task's own address. Every packet of such a connection asks,
/// so the set takes no lock: a 2-way set-associative table of the tuples' 64-bit hashes, each
/// slot an atomic. The hash is keyed at random (std's SipHash), as conntrack's index is, so that
/// no one can pick tuples that push others out. Bounded: a full bucket forgets one of its two tuples, which costs that
/// connection one refuted packet; two tuples with the same 64-bit hash are taken for one.
#[derive(Debug)]
pub struct Unbalanced {
    /// Allocated by the first insert: most nodes never see such a connection.
    slots: OnceLock<Box<[AtomicU64]>>,
    buckets: usize,
    hasher: RandomState,
}

impl Unbalanced {
    /// An empty set of about `capacity` tuples (rounded up to a whole bucket).
    pub fn new(capacity: usize) -> Unbalanced {
        Unbalanced {
            slots: OnceLock::new(),
            buckets: capacity.div_ceil(WAYS).max(1),
            hasher: RandomState::new(),
        }
    }

    pub fn insert(&self, reply: Tuple) {
        let key = self.key(&reply);
        let slots = self.slots.get_or_init(|| {
            (0..self.buckets * WAYS)
                .map(|_| AtomicU64::new(EMPTY))
                .collect()
        });
        let bucket = &slots[self.bucket(key)];
        if bucket
            .iter()
            .any(|slot| slot.load(Ordering::Relaxed) == key)
        {
            return;
        }
        let free = bucket.iter().find(|slot| {
            slot.compare_exchange(EMPTY, key, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        });
        if free.is_none() {
            // Full: the key's own top bit picks which of the two to forget.
            bucket[(key >> 63) as usize].store(key, Ordering::Relaxed);
        }
    }

    pub fn contains(&self, reply: &Tuple) -> bool {
        let key = self.key(reply);
        self.slots.get().is_some_and(|slots| {
            slots[self.bucket(key)]
                .iter()
                .any(|slot| slot.load(Ordering::Relaxed) == key)
        })
    }

    /// A tuple's slot value, never [`EMPTY`].
    fn key(&self, tuple: &Tuple) -> u64 {
        self.hasher.hash_one(tuple).max(1)
    }

    fn bucket(&self, key: u64) -> std::ops::Range<usize> {
        let first = (key % self.buckets as u64) as usize * WAYS;
        first..first + WAYS
    }
}

const WAYS: usize = 2;
const EMPTY: u64 = 0;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;
    use crate::conntrack::Via;
    use crate::service::{Backend, Health, Spec};
    use crate::{Vip, maglev};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 100);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, last)
    }

    fn table(tasks: &[u8]) -> Table {
        let backends = tasks
            .iter()
            .map(|&t| Backend {
                addr: ip(t),
                node: Ipv4Addr::new(198, 18, 0, t % 3 + 1),
                health: Health::Healthy,
            })
            .collect();
        let spec = Spec {
            name: "web".into(),
            vip: Vip(VIP.into()),
            backends,
            ports: Vec::new(),
        };
        Table::build(maglev::Size::new(251).unwrap(), [spec]).unwrap()
    }

    /// The flow the balancer makes for `original`'s first packet, and the tuple of its replies.
    fn balanced(services: &Table, original: Tuple) -> (Nat, Tuple) {
        let service = services.service_for(*original.dst.ip()).unwrap();
        let task = service.pick(original.stable_hash()).unwrap();
        let nat = vip_nat(task.addr, &original);
        let reply = Tuple::new(
            original.proto,
            nat.backend,
            nat.source.unwrap_or(original.src),
        );
        (nat, reply)
    }

    proptest! {
        /// Every reply of a balanced flow, from a client or from a task calling its own VIP,
        /// gives back that flow, whatever the tasks.
        #[test]
        fn a_reply_gives_back_the_flow_the_balancer_made(
            tasks in prop::collection::btree_set(2u8..60, 1..8),
            client in 60u8..99,
            hairpin in any::<bool>(),
            cport in 1024u16..,
            port in 1u16..,
        ) {
            let tasks: Vec<u8> = tasks.into_iter().collect();
            let services = table(&tasks);
            let from = if hairpin { ip(tasks[0]) } else { ip(client) };
            let original = Tuple::new(
                Protocol::Tcp,
                SocketAddrV4::new(from, cport),
                SocketAddrV4::new(VIP, port),
            );
            let (nat, reply) = balanced(&services, original);
            prop_assert_eq!(answered(&services, &reply), Some((original, nat)));
        }

        /// A task's packet to a client whose flow to the VIP would go to another task is not
        /// taken for a reply.
        #[test]
        fn a_packet_from_a_task_the_hash_did_not_pick_is_no_reply(
            tasks in prop::collection::btree_set(2u8..60, 2..8),
            client in 60u8..99,
            cport in 1024u16..,
            port in 1u16..,
        ) {
            let tasks: Vec<u8> = tasks.into_iter().collect();
            let services = table(&tasks);
            let original = Tuple::new(
                Protocol::Tcp,
                SocketAddrV4::new(ip(client), cport),
                SocketAddrV4::new(VIP, port),
            );
            let (nat, _) = balanced(&services, original);
            for other in tasks.iter().map(|&t| ip(t)).filter(|&t| t != *nat.backend.ip()) {
                let reply = Tuple::new(Protocol::Tcp, SocketAddrV4::new(other, port), original.src);
                prop_assert_eq!(answered(&services, &reply), None);
            }
        }
    }

    #[test]
    fn packets_from_non_tasks_are_not_derived_and_udp_is_like_tcp() {
        let services = table(&[7]);
        let client = SocketAddrV4::new(ip(70), 40_000);
        let udp = Tuple::new(Protocol::Udp, SocketAddrV4::new(ip(7), 53), client);
        let (original, _) = answered(&services, &udp).unwrap();
        assert_eq!(
            original,
            Tuple::new(Protocol::Udp, client, SocketAddrV4::new(VIP, 53))
        );
        let stranger = Tuple::new(Protocol::Tcp, SocketAddrV4::new(ip(8), 80), client);
        assert_eq!(answered(&services, &stranger), None);
        let tcp = Tuple::new(Protocol::Tcp, SocketAddrV4::new(ip(7), 80), client);
        let (original, nat) = answered(&services, &tcp).unwrap();
        assert_eq!(original.dst, SocketAddrV4::new(VIP, 80));
        assert_eq!((nat.source, nat.via), (None, Via::Overlay));
    }

    #[test]
    fn the_unbalanced_set_is_bounded_and_forgets_one_tuple_of_a_full_bucket() {
        let t = |port| {
            Tuple::new(
                Protocol::Tcp,
                SocketAddrV4::new(ip(7), 80),
                SocketAddrV4::new(ip(70), port),
            )
        };
        // One bucket of two: the third tuple takes the place of one of the first two.
        let set = Unbalanced::new(2);
        assert!(!set.contains(&t(1)));
        set.insert(t(1));
        set.insert(t(2));
        set.insert(t(2));
        assert!(set.contains(&t(1)) && set.contains(&t(2)));
        set.insert(t(3));
        assert!(set.contains(&t(3)));
        assert_eq!([t(1), t(2)].iter().filter(|t| set.contains(t)).count(), 1);
        assert!(!set.contains(&t(4)));
    }

    proptest! {
        /// Well within its capacity the set keeps every tuple but for a rare bucket that three
        /// of them hash to (at the balancer's size and 200 tuples: about 1 in 800 draws loses
        /// one; losing 3 has odds of about 1e-10).
        #[test]
        fn the_unbalanced_set_keeps_what_fits(ports in prop::collection::hash_set(1u16.., 1..200)) {
            let set = Unbalanced::new(64 * 1024);
            let tuples: Vec<_> = ports
                .iter()
                .map(|&p| Tuple::new(Protocol::Tcp, SocketAddrV4::new(ip(7), 80), SocketAddrV4::new(ip(70), p)))
                .collect();
            for t in &tuples {
                set.insert(*t);
            }
            let kept = tuples.iter().filter(|t| set.contains(t)).count();
            prop_assert!(kept + 2 >= tuples.len(), "{kept} of {}", tuples.len());
        }
    }
}
