use super::tcp_flags::{ACK, FIN, RST, SYN};
use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

const SEC: Duration = Duration::from_secs(1);

fn addr(host: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, host), port)
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), port)
}

fn flow(proto: Protocol, client: u8, sport: u16) -> Tuple {
    Tuple::new(proto, addr(client, sport), vip(80))
}

fn to(backend: u8) -> Nat {
    Nat {
        backend: addr(backend, 80),
        source: None,
        via: Via::Overlay,
    }
}

fn table(capacity: u32) -> Table {
    Table::new(capacity, Timeouts::default()).unwrap()
}

impl Table {
    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().filter_map(|s| s.entry.as_ref())
    }

    /// Everything that must hold between any two calls.
    fn check_invariants(&self, index_capacity: usize) {
        assert!(self.len() <= self.capacity());
        assert_eq!(self.entries().count(), self.len());
        assert_eq!(self.index.len(), 2 * self.len(), "two keys per entry");
        // Never reallocated after construction. std's `capacity()` is the entries plus the
        // room left before it must grow, which deleted buckets reduce until it rehashes in
        // place; only reallocation (to twice the buckets) makes it larger.
        assert!(
            self.index.capacity() <= index_capacity,
            "index grew: {} > {index_capacity}",
            self.index.capacity()
        );
        for e in self.entries() {
            let (d, o) = self.get(&e.original()).unwrap();
            assert_eq!((d, o), (Direction::Original, e));
            let (d, r) = self.get(&e.reply()).unwrap();
            assert_eq!((d, r), (Direction::Reply, e));
            assert_eq!(e.deadline, e.last_seen + self.timeouts.of(e.state));
        }
        // Each list holds exactly the entries of its state, in deadline order, doubly linked.
        let mut listed = 0;
        for state in State::ALL {
            let list = self.lists[state.list()];
            let (mut prev, mut at, mut last) = (NIL, list.head, None);
            while at != NIL {
                let s = self.slot(at);
                let e = s.entry.unwrap();
                assert_eq!(e.state, state);
                assert_eq!(s.prev, prev);
                assert!(
                    last <= Some(e.deadline),
                    "{state:?} list out of deadline order"
                );
                last = Some(e.deadline);
                prev = at;
                at = s.next;
                listed += 1;
            }
            assert_eq!(list.tail, prev);
        }
        assert_eq!(listed, self.len());
        let mut free = 0;
        let mut at = self.free;
        while at != NIL {
            assert!(self.slot(at).entry.is_none());
            at = self.slot(at).next;
            free += 1;
        }
        assert_eq!(free + self.len(), self.capacity());
        // The next deadline is the earliest entry's.
        assert_eq!(
            self.poll_timeout(),
            self.entries().map(|e| e.deadline).min()
        );
    }
}

#[test]
fn both_directions_find_one_entry() {
    let t0 = Instant::now();
    let mut ct = table(16);
    let f = flow(Protocol::Tcp, 5, 40_000);
    let e = ct.insert(t0, f, to(9), SYN).unwrap();
    assert_eq!(
        e.reply(),
        Tuple::new(Protocol::Tcp, addr(9, 80), addr(5, 40_000))
    );
    assert_eq!(ct.get(&f), Some((Direction::Original, &e)));
    assert_eq!(ct.get(&e.reply()), Some((Direction::Reply, &e)));
    // The NATed packet itself (client -> backend) is not a key: only the two tuples are.
    assert_eq!(
        ct.get(&Tuple::new(Protocol::Tcp, addr(5, 40_000), addr(9, 80))),
        None
    );
    assert_eq!(ct.len(), 1);
}

#[test]
fn hairpin_reply_comes_back_to_the_rewritten_source() {
    let t0 = Instant::now();
    let mut ct = table(16);
    // Task 9 connects to its own service's VIP and lands on itself.
    let f = flow(Protocol::Udp, 9, 5353);
    let rewritten = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 61_000);
    let nat = Nat {
        backend: addr(9, 80),
        source: Some(rewritten),
        via: Via::Overlay,
    };
    let e = ct.insert(t0, f, nat, 0).unwrap();
    let reply = Tuple::new(Protocol::Udp, addr(9, 80), rewritten);
    assert_eq!(e.reply(), reply);
    let (dir, hit) = ct.track(t0, &reply, 0).unwrap();
    assert_eq!((dir, hit.original()), (Direction::Reply, f));
    assert_eq!(hit.state(), State::UdpReplied);
}

#[test]
fn refusals_leave_the_table_unchanged() {
    let t0 = Instant::now();
    let mut ct = table(16);
    let a = ct
        .insert(t0, flow(Protocol::Tcp, 5, 40_000), to(9), SYN)
        .unwrap();
    let before = ct.entries().copied().collect::<Vec<_>>();
    let index_capacity = ct.index.capacity();
    assert_eq!(
        ct.insert(t0, a.original(), to(8), SYN),
        Err(Error::Exists(Direction::Original))
    );
    assert_eq!(
        ct.insert(t0, a.reply(), to(8), SYN),
        Err(Error::Exists(Direction::Reply))
    );
    // Same client port to a second VIP that lands on the same backend and port: the
    // backend's replies could not be told apart.
    let other_vip = Tuple::new(
        Protocol::Tcp,
        addr(5, 40_000),
        SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 2), 80),
    );
    assert_eq!(ct.insert(t0, other_vip, to(9), SYN), Err(Error::ReplyClash));
    assert_eq!(ct.entries().copied().collect::<Vec<_>>(), before);
    ct.check_invariants(index_capacity);
    assert_eq!(
        Table::new(0, Timeouts::default()).err(),
        Some(Error::Capacity(0))
    );
    assert_eq!(
        Table::new(MAX_CAPACITY + 1, Timeouts::default()).err(),
        Some(Error::Capacity(MAX_CAPACITY + 1))
    );
}

/// A table with one TCP flow that has sent its SYN at the returned time.
fn one_syn() -> (Instant, Table, Entry) {
    let t0 = Instant::now();
    let mut ct = table(4);
    let e = ct
        .insert(t0, flow(Protocol::Tcp, 5, 40_000), to(9), SYN)
        .unwrap();
    (t0, ct, e)
}

#[test]
fn tcp_lifecycle_expires_at_each_states_deadline() {
    let (t0, mut ct, e) = one_syn();
    let (f, to_s) = (e.original(), Timeouts::default());
    assert_eq!(e.state(), State::TcpSynSent);
    assert_eq!(ct.poll_timeout(), Some(t0 + to_s.tcp_syn_sent));

    let t1 = t0 + SEC;
    let (_, e) = ct.track(t1, &e.reply(), SYN | ACK).unwrap();
    assert_eq!(e.state(), State::TcpEstablished);
    assert_eq!(ct.poll_timeout(), Some(t1 + to_s.tcp_established));

    let t2 = t1 + SEC;
    let (_, e) = ct.track(t2, &f, FIN | ACK).unwrap();
    assert_eq!(e.state(), State::TcpFinWait);
    let t3 = t2 + SEC;
    let (_, e) = ct.track(t3, &e.reply(), FIN | ACK).unwrap();
    assert_eq!(e.state(), State::TcpTimeWait);
    let deadline = t3 + to_s.tcp_time_wait;
    assert_eq!(ct.poll_timeout(), Some(deadline));

    ct.handle_timeout(deadline - Duration::from_nanos(1));
    assert_eq!(ct.len(), 1, "not a nanosecond early");
    ct.handle_timeout(deadline);
    assert_eq!(ct.len(), 0, "exactly at the deadline");
    assert_eq!(ct.get(&f), None);
    assert_eq!(ct.poll_timeout(), None);
    assert_eq!(ct.stats().expired, 1);
}

#[test]
fn rst_closes_quickly_and_a_new_syn_reopens() {
    let (t0, mut ct, e) = one_syn();
    let (f, to_s) = (e.original(), Timeouts::default());
    ct.track(t0, &e.reply(), SYN | ACK);
    let (_, e) = ct.track(t0 + SEC, &e.reply(), RST).unwrap();
    assert_eq!(e.state(), State::TcpClose);
    assert_eq!(ct.poll_timeout(), Some(t0 + SEC + to_s.tcp_close));
    let (_, e) = ct.track(t0 + 2 * SEC, &f, SYN).unwrap();
    assert_eq!(e.state(), State::TcpSynSent);
}

#[test]
fn udp_unreplied_and_replied_timeouts() {
    let t0 = Instant::now();
    let to_s = Timeouts::default();
    let mut ct = table(4);
    let lonely = ct
        .insert(t0, flow(Protocol::Udp, 5, 1000), to(9), 0)
        .unwrap();
    let answered = ct
        .insert(t0, flow(Protocol::Udp, 6, 1000), to(9), 0)
        .unwrap();
    ct.track(t0, &answered.reply(), 0);
    ct.handle_timeout(t0 + to_s.udp_unreplied);
    assert_eq!(ct.get(&lonely.original()), None);
    assert!(ct.get(&answered.original()).is_some());
    ct.handle_timeout(t0 + to_s.udp_replied - Duration::from_nanos(1));
    assert!(ct.get(&answered.original()).is_some());
    ct.handle_timeout(t0 + to_s.udp_replied);
    assert!(ct.is_empty());
}

#[test]
fn full_table_evicts_embryonic_first_then_oldest() {
    let t0 = Instant::now();
    let mut ct = table(3);
    let index_capacity = ct.index.capacity();
    let old = ct
        .insert(t0, flow(Protocol::Tcp, 1, 1), to(9), SYN)
        .unwrap();
    ct.track(t0, &old.reply(), SYN | ACK);
    let syn = ct
        .insert(t0 + SEC, flow(Protocol::Tcp, 2, 1), to(9), SYN)
        .unwrap();
    let newer = ct
        .insert(t0 + 2 * SEC, flow(Protocol::Udp, 3, 1), to(9), 0)
        .unwrap();
    ct.track(t0 + 2 * SEC, &newer.reply(), 0);
    // Full: the SYN-only flow goes although the established one is older.
    ct.insert(t0 + 3 * SEC, flow(Protocol::Udp, 4, 1), to(9), 0)
        .unwrap();
    assert_eq!(ct.get(&syn.original()), None);
    assert!(ct.get(&old.original()).is_some());
    // Full again: the unreplied UDP flow just inserted is the only embryonic one.
    let e = ct
        .insert(t0 + 4 * SEC, flow(Protocol::Udp, 5, 1), to(9), 0)
        .unwrap();
    assert_eq!(ct.get(&flow(Protocol::Udp, 4, 1)), None);
    ct.track(t0 + 4 * SEC, &e.reply(), 0);
    // No embryonic entry left: the one idle longest (the established TCP flow) goes.
    ct.insert(t0 + 5 * SEC, flow(Protocol::Udp, 6, 1), to(9), 0)
        .unwrap();
    assert_eq!(ct.get(&old.original()), None);
    assert_eq!(ct.len(), 3);
    let stats = ct.stats();
    assert_eq!((stats.evicted_embryonic, stats.evicted_oldest), (2, 1));
    ct.check_invariants(index_capacity);
}

#[test]
fn removed_backend_flows_are_gone_then_expire() {
    let (t0, mut ct, a) = one_syn();
    let to_s = Timeouts::default();
    ct.track(t0, &a.reply(), SYN | ACK);
    let b = ct.insert(t0, flow(Protocol::Udp, 2, 1), to(9), 0).unwrap();
    let kept = ct
        .insert(t0, flow(Protocol::Tcp, 3, 1), to(8), SYN)
        .unwrap();
    let t1 = t0 + SEC;
    assert_eq!(ct.remove_backend(t1, *addr(9, 0).ip()), 2);
    assert_eq!(ct.remove_backend(t1, *addr(9, 0).ip()), 0, "only once");
    let (_, e) = ct.track(t1 + SEC, &a.original(), ACK).unwrap();
    assert!(e.is_backend_gone());
    assert!(ct.get(&b.reply()).unwrap().1.is_backend_gone());
    assert!(!ct.get(&kept.original()).unwrap().1.is_backend_gone());
    // Packets do not keep a gone flow alive.
    ct.handle_timeout(t1 + to_s.backend_gone);
    assert_eq!(ct.get(&a.original()), None);
    assert_eq!(ct.get(&b.original()), None);
    assert_eq!(ct.len(), 1);
    assert_eq!(ct.stats().backend_gone, 2);
}

#[test]
fn churn_never_reallocates_the_index() {
    let t0 = Instant::now();
    let mut ct = table(1024);
    let index_capacity = ct.index.capacity();
    // Far more distinct flows than slots: every insert past the first 1024 evicts, leaving
    // deleted buckets behind in the index.
    for i in 0..100_000u32 {
        let f = Tuple::new(
            Protocol::Udp,
            SocketAddrV4::new(Ipv4Addr::from(0xc613_0000 | (i >> 12)), (i & 0xfff) as u16),
            vip(53),
        );
        ct.insert(t0, f, to(9), 0).unwrap();
    }
    assert_eq!(ct.stats().evicted_embryonic, 100_000 - 1024);
    ct.check_invariants(index_capacity);
}

#[test]
fn time_going_back_does_not_unsort_the_timers() {
    let t0 = Instant::now() + 100 * SEC;
    let mut ct = table(4);
    let index_capacity = ct.index.capacity();
    let a = ct.insert(t0, flow(Protocol::Udp, 1, 1), to(9), 0).unwrap();
    let b = ct
        .insert(t0 - 50 * SEC, flow(Protocol::Udp, 2, 1), to(9), 0)
        .unwrap();
    assert_eq!(
        b.deadline(),
        a.deadline(),
        "clamped to the latest time seen"
    );
    ct.check_invariants(index_capacity);
}

/// One step of a random workload over a small address space, so that flows collide, the
/// table fills and backends come and go.
#[derive(Clone, Debug)]
enum Op {
    Connect {
        udp: bool,
        client: u8,
        sport: u16,
        backend: u8,
        hairpin: bool,
        flags: u8,
    },
    /// A packet of the n-th tracked flow (modulo), in one direction.
    Packet {
        pick: prop::sample::Index,
        reply: bool,
        flags: u8,
    },
    Advance(u32),
    /// The clock jumps to the next deadline the table announced.
    ToNextDeadline,
    RemoveBackend(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let flags = prop::sample::select(vec![0, SYN, SYN | ACK, ACK, FIN | ACK, RST, RST | ACK]);
    prop_oneof![
        4 => (any::<bool>(), 1u8..6, 1u16..4, 1u8..4, prop::bool::weighted(0.2), flags.clone())
            .prop_map(|(udp, client, sport, backend, hairpin, flags)| Op::Connect {
                udp, client, sport, backend, hairpin, flags,
            }),
        5 => (any::<prop::sample::Index>(), any::<bool>(), flags)
            .prop_map(|(pick, reply, flags)| Op::Packet { pick, reply, flags }),
        3 => (0u32..200_000).prop_map(Op::Advance),
        2 => Just(Op::ToNextDeadline),
        1 => (1u8..4).prop_map(Op::RemoveBackend),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random packets, clock steps and backend removals, checked after every step against
    /// the table's invariants (both tuples reach the one entry, capacity, lists, index never
    /// reallocated) and against a model of when each flow must expire: a flow is present
    /// exactly while the clock is before its last packet plus its state's timeout.
    #[test]
    fn random_workload_keeps_invariants(ops in prop::collection::vec(op(), 1..120), cap in 1u32..8) {
        let timeouts = Timeouts {
            tcp_syn_sent: 3 * SEC,
            tcp_established: 50 * SEC,
            tcp_fin_wait: 7 * SEC,
            tcp_time_wait: 5 * SEC,
            tcp_close: SEC,
            udp_unreplied: 2 * SEC,
            udp_replied: 11 * SEC,
            backend_gone: 4 * SEC,
        };
        let mut ct = Table::new(cap, timeouts).unwrap();
        let index_capacity = ct.index.capacity();
        let mut now = Instant::now();
        // The model: each tracked flow's deadline, by original tuple.
        let mut model: HashMap<Tuple, Instant> = HashMap::new();
        for op in ops {
            match op {
                Op::Connect { udp, client, sport, backend, hairpin, flags } => {
                    let proto = if udp { Protocol::Udp } else { Protocol::Tcp };
                    let original = flow(proto, client, sport);
                    let nat = Nat {
                        backend: addr(10 + backend, 80),
                        source: hairpin.then(|| vip(50_000 + sport)),
                        via: Via::Overlay,
                    };
                    let full = ct.len() == ct.capacity();
                    match ct.insert(now, original, nat, flags) {
                        Ok(e) => {
                            if full {
                                let evicted: Vec<_> = model.keys()
                                    .filter(|k| ct.get(k).is_none()).copied().collect();
                                prop_assert_eq!(evicted.len(), 1, "one eviction when full");
                                model.remove(&evicted[0]);
                            }
                            prop_assert_eq!(e.deadline(), now + timeouts.of(e.state()));
                            model.insert(original, e.deadline());
                        }
                        Err(Error::Exists(_)) => prop_assert!(ct.get(&original).is_some()),
                        Err(Error::ReplyClash) => prop_assert!(ct.get(&reply_of(&original, &nat)).is_some()),
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Packet { pick, reply, flags } => {
                    let mut tracked: Vec<Entry> = ct.entries().copied().collect();
                    if tracked.is_empty() {
                        continue;
                    }
                    tracked.sort_by_key(|e| e.original());
                    let before = *pick.get(&tracked);
                    let tuple = if reply { before.reply() } else { before.original() };
                    let (dir, e) = ct.track(now, &tuple, flags).unwrap();
                    prop_assert_eq!(dir, if reply { Direction::Reply } else { Direction::Original });
                    prop_assert_eq!(e.original(), before.original());
                    if before.is_backend_gone() {
                        prop_assert_eq!(e, before, "a gone flow is not refreshed");
                    } else {
                        prop_assert_eq!(e.deadline(), now + timeouts.of(e.state()));
                        model.insert(e.original(), e.deadline());
                    }
                }
                Op::Advance(_) | Op::ToNextDeadline => {
                    now = match op {
                        Op::Advance(ms) => now + Duration::from_millis(u64::from(ms) / 10),
                        _ => ct.poll_timeout().unwrap_or(now),
                    };
                    ct.handle_timeout(now);
                    model.retain(|_, deadline| *deadline > now);
                    if let Some(next) = ct.poll_timeout() {
                        prop_assert!(next > now);
                    }
                }
                Op::RemoveBackend(b) => {
                    let backend = *addr(10 + b, 0).ip();
                    let to_mark: Vec<Tuple> = ct.entries()
                        .filter(|e| *e.nat().backend.ip() == backend && !e.is_backend_gone())
                        .map(|e| e.original())
                        .collect();
                    let marked = ct.remove_backend(now, backend);
                    for original in &to_mark {
                        prop_assert!(ct.get(original).unwrap().1.is_backend_gone());
                        model.insert(*original, now + timeouts.backend_gone);
                    }
                    let expected = to_mark.len();
                    prop_assert_eq!(marked, expected);
                }
            }
            ct.check_invariants(index_capacity);
            let present: HashSet<Tuple> = ct.entries().map(|e| e.original()).collect();
            let modelled: HashSet<Tuple> = model.keys().copied().collect();
            prop_assert_eq!(&present, &modelled);
            for e in ct.entries() {
                prop_assert_eq!(e.deadline(), model[&e.original()]);
            }
        }
    }
}

#[test]
fn a_forgotten_flow_is_gone_in_both_directions() {
    let t0 = Instant::now();
    let mut ct = table(4);
    let f = flow(Protocol::Udp, 1, 5353);
    let e = ct.insert(t0, f, to(7), 0).unwrap();
    assert!(ct.forget(&e.reply()));
    assert!(ct.get(&f).is_none() && ct.get(&e.reply()).is_none());
    assert!(!ct.forget(&f));
    assert_eq!(ct.len(), 0);
    assert!(
        ct.insert(t0, f, to(8), 0).is_ok(),
        "its tuples are free again"
    );
}
