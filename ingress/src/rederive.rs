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
//! UDP is not derived: a lost datagram is the application's to resend, and an un-NATed one is
//! dropped by the client's socket without a reset.

use std::collections::HashSet;
use std::net::SocketAddrV4;

use crate::Protocol;
use crate::balancer::vip_nat;
use crate::conntrack::Nat;
use crate::flow::Tuple;
use crate::service::Table;

/// The flow that `reply`, a TCP packet from a task that no tracked flow expects, answers: its
/// original tuple (client -> VIP:port) and NAT, as the balancer made them when the flow
/// started. `None` when no service would send such a flow to this task.
pub fn answered(services: &Table, reply: &Tuple) -> Option<(Tuple, Nat)> {
    if reply.proto != Protocol::Tcp {
        return None;
    }
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
/// pass untouched: a connection to a task's own address. Bounded: when full it starts over,
/// which costs a connection it forgot one refuted packet.
#[derive(Debug)]
pub struct Unbalanced {
    seen: HashSet<Tuple>,
    capacity: usize,
}

impl Unbalanced {
    /// An empty set of at most `capacity` tuples, allocated by its first insert.
    pub fn new(capacity: usize) -> Unbalanced {
        Unbalanced {
            seen: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn insert(&mut self, reply: Tuple) {
        if self.seen.len() >= self.capacity {
            self.seen.clear();
        }
        if self.seen.capacity() == 0 {
            self.seen.reserve(self.capacity);
        }
        self.seen.insert(reply);
    }

    pub fn contains(&self, reply: &Tuple) -> bool {
        self.seen.contains(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn udp_and_packets_from_non_tasks_are_not_derived() {
        let services = table(&[7]);
        let client = SocketAddrV4::new(ip(70), 40_000);
        let udp = Tuple::new(Protocol::Udp, SocketAddrV4::new(ip(7), 53), client);
        assert_eq!(answered(&services, &udp), None);
        let stranger = Tuple::new(Protocol::Tcp, SocketAddrV4::new(ip(8), 80), client);
        assert_eq!(answered(&services, &stranger), None);
        let tcp = Tuple::new(Protocol::Tcp, SocketAddrV4::new(ip(7), 80), client);
        let (original, nat) = answered(&services, &tcp).unwrap();
        assert_eq!(original.dst, SocketAddrV4::new(VIP, 80));
        assert_eq!((nat.source, nat.via), (None, Via::Overlay));
    }

    #[test]
    fn the_unbalanced_set_is_bounded_and_starts_over_when_full() {
        let t = |port| {
            Tuple::new(
                Protocol::Tcp,
                SocketAddrV4::new(ip(7), 80),
                SocketAddrV4::new(ip(70), port),
            )
        };
        let mut set = Unbalanced::new(2);
        set.insert(t(1));
        set.insert(t(2));
        assert!(set.contains(&t(1)) && set.contains(&t(2)));
        set.insert(t(3));
        assert!(set.contains(&t(3)) && !set.contains(&t(1)));
    }
}
