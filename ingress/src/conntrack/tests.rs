use super::tcp_flags::{ACK, FIN, RST, SYN};
use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

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

fn table(capacity: u32, epoch: Instant) -> Table {
    Table::new(Capacity::new(capacity).unwrap(), Timeouts::default(), epoch)
}

impl Locked<'_> {
    fn entries(&self) -> Vec<Entry> {
        (0..self.table.slots.len() as u32)
            .filter_map(|slot| Some(self.table.entry(self.record(slot)?, self.seen(slot))))
            .collect()
    }

    /// Everything that must hold between any two calls.
    fn check_invariants(&self) {
        let table = self.table;
        assert!(self.len() <= table.capacity());
        let entries = self.entries();
        assert_eq!(entries.len(), self.len());
        for e in &entries {
            assert_eq!(self.get(&e.original()), Some((Direction::Original, *e)));
            assert_eq!(self.get(&e.reply()), Some((Direction::Reply, *e)));
            assert_eq!(e.deadline, e.last_seen + table.timeouts.of(e.state()));
        }
        // Two index words per entry, each reachable from its home without an empty word
        // (what lets a look-up stop at the first empty one), each its tuple's.
        let mask = table.index.len() - 1;
        let words: Vec<u64> = table
            .index
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        assert_eq!(words.iter().filter(|w| **w != 0).count(), 2 * self.len());
        for (at, &word) in words.iter().enumerate().filter(|(_, w)| **w != 0) {
            let mut home = word_hash(word) as usize & mask;
            while home != at {
                assert_ne!(words[home], 0, "word at {at} cut off from its home");
                home = (home + 1) & mask;
            }
            let slot = word_slot(word);
            let record = self
                .record(slot)
                .expect("an index word leads to a free slot");
            let (tuple, direction) = if word >> 31 & 1 == 0 {
                (record.original, Direction::Original)
            } else {
                (record.reply(), Direction::Reply)
            };
            assert_eq!(
                word,
                index_word(table.hasher.hash_one(tuple), slot, direction)
            );
        }
        // Every slot is free or holds an entry; no writer is halfway through anything; the
        // free list is never reallocated.
        let free: HashSet<u32> = self.writer.free.iter().copied().collect();
        assert_eq!(free.len(), self.writer.free.len());
        assert_eq!(free.len() + self.len(), table.capacity());
        assert!(free.iter().all(|slot| self.record(*slot).is_none()));
        assert_eq!(self.writer.free.capacity(), table.capacity());
        assert!(
            table
                .slots
                .iter()
                .all(|s| s.seq.load(Ordering::Relaxed) % 2 == 0)
        );
        assert_eq!(table.shifting.load(Ordering::Relaxed) % 2, 0);
    }
}

#[test]
fn both_directions_find_one_entry() {
    let t0 = Instant::now();
    let t = table(16, t0);
    let mut ct = t.lock();
    let f = flow(Protocol::Tcp, 5, 40_000);
    let e = ct.insert(t0, f, to(9), SYN).unwrap();
    assert_eq!(
        e.reply(),
        Tuple::new(Protocol::Tcp, addr(9, 80), addr(5, 40_000))
    );
    assert_eq!(ct.get(&f), Some((Direction::Original, e)));
    assert_eq!(ct.get(&e.reply()), Some((Direction::Reply, e)));
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
    let t = table(16, t0);
    let mut ct = t.lock();
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
    let t = table(16, t0);
    let mut ct = t.lock();
    let a = ct
        .insert(t0, flow(Protocol::Tcp, 5, 40_000), to(9), SYN)
        .unwrap();
    let before = ct.entries();
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
    assert_eq!(ct.entries(), before);
    ct.check_invariants();
    assert_eq!(Capacity::new(0), Err(Error::Capacity(0)));
    assert_eq!(
        Capacity::new(MAX_CAPACITY + 1),
        Err(Error::Capacity(MAX_CAPACITY + 1))
    );
}

/// A table with one TCP flow that has sent its SYN at the returned time.
fn one_syn() -> (Instant, Table, Entry) {
    let t0 = Instant::now();
    let t = table(4, t0);
    let e = t
        .lock()
        .insert(t0, flow(Protocol::Tcp, 5, 40_000), to(9), SYN)
        .unwrap();
    (t0, t, e)
}

#[test]
fn tcp_lifecycle_expires_at_each_states_deadline() {
    let (t0, t, e) = one_syn();
    let mut ct = t.lock();
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
    let (t0, t, e) = one_syn();
    let mut ct = t.lock();
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
    let t = table(4, t0);
    let mut ct = t.lock();
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
    let t = table(3, t0);
    let mut ct = t.lock();
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
    ct.check_invariants();
}

#[test]
fn removed_backend_flows_are_gone_then_expire() {
    let (t0, t, a) = one_syn();
    let mut ct = t.lock();
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
fn churn_keeps_the_index_whole() {
    let t0 = Instant::now();
    let t = table(1024, t0);
    let mut ct = t.lock();
    // Far more distinct flows than slots: every insert past the first 1024 evicts, and every
    // eviction moves index words back.
    for i in 0..20_000u32 {
        let f = Tuple::new(
            Protocol::Udp,
            SocketAddrV4::new(Ipv4Addr::from(0xc613_0000 | (i >> 12)), (i & 0xfff) as u16),
            vip(53),
        );
        ct.insert(t0, f, to(9), 0).unwrap();
    }
    assert_eq!(ct.stats().evicted_embryonic, 20_000 - 1024);
    ct.check_invariants();
}

/// A SYN flood into a large full table: each insert looks at [`EVICTION_RANGE`] slots, yet
/// the flood evicts only its own SYNs, never an established flow, and a real client's SYN sent
/// in the middle of it outlives nearly a table's worth of spoofed SYNs (time for its reply).
#[test]
fn a_syn_flood_evicts_only_syns_and_a_new_flow_outlives_most_of_a_table_of_them() {
    const SLOTS: u32 = 4096;
    let t0 = Instant::now();
    let t = table(SLOTS, t0);
    let mut ct = t.lock();
    let kept = established(&mut ct, t0, 1, 1);
    let spoofed = |i: u32| {
        let client = SocketAddrV4::new(Ipv4Addr::from(0xc612_0000 | (i >> 16)), i as u16);
        Tuple::new(Protocol::Tcp, client, vip(80))
    };
    // One SYN a microsecond, the real one among them.
    let at = |i: u32| t0 + SEC + Duration::from_micros(i.into());
    let mut sent = 0;
    let mut flood = |ct: &mut Locked<'_>, n: u32| {
        for _ in 0..n {
            sent += 1;
            ct.insert(at(sent), spoofed(sent), to(9), SYN).unwrap();
        }
    };
    flood(&mut ct, 3 * SLOTS);
    let real = ct
        .insert(at(3 * SLOTS), flow(Protocol::Tcp, 2, 2), to(9), SYN)
        .unwrap();
    let survived = (1..=SLOTS)
        .find(|_| {
            flood(&mut ct, 1);
            ct.get(&real.original()).is_none()
        })
        .unwrap_or(SLOTS);
    assert!(
        survived > SLOTS - 2 * EVICTION_RANGE,
        "a new SYN was evicted after {survived} spoofed SYNs"
    );
    flood(&mut ct, 3 * SLOTS);
    assert!(
        ct.get(&kept.original()).is_some(),
        "the established flow stays"
    );
    assert_eq!(ct.stats().evicted_oldest, 0);
    ct.check_invariants();
}

#[test]
fn a_packet_with_an_earlier_time_does_not_shorten_a_flow() {
    // Workers read the clock each on its own: their times reach a flow out of order.
    let t0 = Instant::now();
    let t = table(4, t0);
    let later = t0 + 100 * SEC;
    let a = t
        .lock()
        .insert(later, flow(Protocol::Udp, 1, 1), to(9), 0)
        .unwrap();
    let Lookup::Found(found) = t.find(&a.original()) else {
        panic!("not found")
    };
    let refreshed = t.refresh(&found, later - 50 * SEC, 0).unwrap();
    assert_eq!(refreshed.deadline(), a.deadline());
    let (_, tracked) = t.lock().track(later - 60 * SEC, &a.reply(), 0).unwrap();
    assert_eq!(tracked.state(), State::UdpReplied);
    assert_eq!(tracked.deadline(), later + Timeouts::default().udp_replied);
    // A time before the table's epoch counts as the epoch.
    if let Some(before) = t0.checked_sub(SEC) {
        let b = t
            .lock()
            .insert(before, flow(Protocol::Udp, 2, 1), to(9), 0)
            .unwrap();
        assert_eq!(b.deadline(), t0 + Timeouts::default().udp_unreplied);
    }
    t.lock().check_invariants();
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
    /// the table's invariants (both tuples reach the one entry, capacity, index, free list)
    /// and against a model of when each flow must expire: a flow is present exactly while the
    /// clock is before its last packet plus its state's timeout. A full table evicts an entry
    /// of the least rank (embryonic first, then idle longest). Packets go through the path
    /// without the lock when it takes them, as the balancer sends them.
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
        let mut now = Instant::now();
        let t = Table::new(Capacity::new(cap).unwrap(), timeouts, now);
        let mut ct = t.lock();
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
                    let full = ct.len() == t.capacity();
                    let rank = |e: &Entry| (!e.state().is_embryonic(), e.last_seen);
                    let before = ct.entries();
                    match ct.insert(now, original, nat, flags) {
                        Ok(e) => {
                            if full {
                                let evicted: Vec<_> = before.iter()
                                    .filter(|e| ct.get(&e.original()).is_none()).collect();
                                prop_assert_eq!(evicted.len(), 1, "one eviction when full");
                                prop_assert_eq!(Some(rank(evicted[0])), before.iter().map(rank).min());
                                model.remove(&evicted[0].original());
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
                    let mut tracked = ct.entries();
                    if tracked.is_empty() {
                        continue;
                    }
                    tracked.sort_by_key(|e| e.original());
                    let before = *pick.get(&tracked);
                    let tuple = if reply { before.reply() } else { before.original() };
                    let Lookup::Found(found) = t.find(&tuple) else {
                        panic!("{tuple:?} not found without the lock")
                    };
                    let (dir, e) = match t.refresh(&found, now, flags) {
                        Some(e) => (found.direction, e),
                        None => ct.track(now, &tuple, flags).unwrap(),
                    };
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
                        .into_iter()
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
            ct.check_invariants();
            let present: HashSet<Tuple> = ct.entries().iter().map(|e| e.original()).collect();
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
    let t = table(4, t0);
    let mut ct = t.lock();
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

/// An established TCP flow from client `client` (198.19.0.x), port `sport`, to backend 9.
fn established(ct: &mut Locked<'_>, now: Instant, client: u8, sport: u16) -> Entry {
    let e = ct
        .insert(now, flow(Protocol::Tcp, client, sport), to(9), SYN)
        .unwrap();
    let (_, e) = ct.track(now, &e.reply(), SYN | ACK).unwrap();
    assert_eq!(e.state(), State::TcpEstablished);
    e
}

/// The path of a packet that leaves its flow in its state takes no lock: with the writer's
/// lock held here, other threads still find every flow in both directions and restart its
/// timeout. A reader that took the lock would wait for ever; the test gives it 10 s.
#[test]
fn a_flows_packets_take_no_lock() {
    let t0 = Instant::now();
    let t = std::sync::Arc::new(table(64, t0));
    let flows: Vec<Entry> = {
        let mut ct = t.lock();
        (0..32)
            .map(|i| established(&mut ct, t0, 5, 40_000 + i))
            .collect()
    };
    let held = t.lock();
    let (done, finished) = std::sync::mpsc::channel();
    for reader in 0..2u32 {
        let (t, flows, done) = (t.clone(), flows.clone(), done.clone());
        std::thread::spawn(move || {
            let now = t0 + (reader + 1) * SEC;
            for e in &flows {
                for (tuple, direction) in [
                    (e.original(), Direction::Original),
                    (e.reply(), Direction::Reply),
                ] {
                    let Lookup::Found(found) = t.find(&tuple) else {
                        panic!("{tuple:?} not found")
                    };
                    assert_eq!(
                        (found.direction, found.entry.original()),
                        (direction, e.original())
                    );
                    let refreshed = t.refresh(&found, now, ACK).expect("no change of state");
                    assert!(refreshed.deadline() >= now + Timeouts::default().tcp_established);
                }
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("a reader waited for the writer's lock");
    }
    drop(held);
    let ct = t.lock();
    ct.check_invariants();
    assert!(ct.entries().iter().all(|e| e.last_seen == t0 + 2 * SEC));
}

/// Readers hammer the table without the lock while a writer churns it: inserts (evicting
/// when full, so slots are reused and index words move back), state changes, backends
/// removed, expiry sweeps, forgotten flows. A reader must always find the flows that stay
/// (or be told to ask under the lock, which then finds them), and whatever it finds must be
/// a whole flow, never a mix of two: each churned flow's backend port is its client port.
#[test]
fn readers_without_the_lock_see_whole_flows_while_the_writer_churns() {
    use std::sync::atomic::AtomicBool;
    const STAYING: u16 = 48;
    const CHURNED: u32 = 1 << 12;
    let t0 = Instant::now();
    let timeouts = Timeouts {
        udp_unreplied: Duration::from_micros(200),
        udp_replied: Duration::from_micros(300),
        backend_gone: Duration::from_micros(100),
        ..Timeouts::default()
    };
    let t = Table::new(Capacity::new(128).unwrap(), timeouts, t0);
    // Seen last a day ahead: a full table never finds them idle longest, so they stay.
    let staying: Vec<Entry> = {
        let mut ct = t.lock();
        let ahead = t0 + Duration::from_secs(24 * 3600);
        (0..STAYING)
            .map(|i| established(&mut ct, ahead, 5, 40_000 + i))
            .collect()
    };
    let churned_backend = Ipv4Addr::new(198, 19, 1, 1);
    let churned = |i: u32| {
        let sport = 1 + (i % CHURNED) as u16;
        let original = Tuple::new(Protocol::Udp, addr(6, sport), vip(53));
        let nat = Nat {
            backend: SocketAddrV4::new(churned_backend, sport),
            source: None,
            via: Via::Host {
                client_mac: [2, 0, 0, 0, (sport >> 8) as u8, sport as u8],
                node_mac: [2, 0, 0, 0, 0, 1],
            },
        };
        (original, nat)
    };
    let writing = AtomicBool::new(true);
    // The writer's clock, a microsecond a change, so that flows fill the table and expire
    // alike however fast the run: microseconds since `t0`.
    let clock = AtomicU64::new(0);
    let now = |clock: &AtomicU64| t0 + Duration::from_micros(clock.load(Ordering::Relaxed));
    let (found, busy) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for reader in 0..3u32 {
            let (t, staying, writing, found, busy, clock) =
                (&t, &staying, &writing, &found, &busy, &clock);
            s.spawn(move || {
                let mut i = reader;
                // Bounded in count too, should the writer never end.
                for _ in 0..20_000_000u32 {
                    if !writing.load(Ordering::Relaxed) {
                        break;
                    }
                    i = i.wrapping_add(7);
                    let e = staying[i as usize % staying.len()];
                    let (tuple, direction) = if i % 2 == 0 {
                        (e.original(), Direction::Original)
                    } else {
                        (e.reply(), Direction::Reply)
                    };
                    match t.find(&tuple) {
                        Lookup::Found(f) => {
                            assert_eq!((f.direction, f.entry.record), (direction, e.record));
                            assert!(t.refresh(&f, now(clock), ACK).is_some());
                            found.fetch_add(1, Ordering::Relaxed);
                        }
                        Lookup::Busy => {
                            assert!(t.lock().get(&tuple).is_some());
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        Lookup::Absent => panic!("a staying flow went missing"),
                    }
                    let (original, nat) = churned(i);
                    let tuple = if i % 3 == 0 {
                        reply_of(&original, &nat)
                    } else {
                        original
                    };
                    if let Lookup::Found(f) = t.find(&tuple) {
                        let (original, nat) = churned(u32::from(f.entry.original().src.port()) - 1);
                        assert_eq!((f.entry.original(), f.entry.nat()), (original, nat));
                        assert!(tuple == original || tuple == reply_of(&original, &nat));
                        t.refresh(&f, now(clock), 0);
                    }
                }
            });
        }
        let mut ct = t.lock();
        // 40k changes, or 3 s of them on a slow (debug, loaded) run.
        let start = std::time::Instant::now();
        for i in 0..40_000u32 {
            if start.elapsed() > Duration::from_secs(3) {
                break;
            }
            let (original, nat) = churned(i.wrapping_mul(2_654_435_761));
            clock.store(u64::from(i), Ordering::Relaxed);
            let now = now(&clock);
            let _ = ct.insert(now, original, nat, 0);
            match i % 16 {
                0 => {
                    ct.forget(&churned(i / 3).0);
                }
                1 => {
                    ct.track(now, &reply_of(&original, &nat), 0);
                }
                2 => ct.handle_timeout(now),
                3 if i % 1024 == 3 => {
                    ct.remove_backend(now, churned_backend);
                }
                _ => {}
            }
            // Let the readers in between changes, as the lock's other users would.
            if i % 64 == 0 {
                drop(ct);
                std::thread::yield_now();
                ct = t.lock();
            }
        }
        // First, so that a failure below does not leave the readers running.
        writing.store(false, Ordering::Relaxed);
        ct.check_invariants();
        let stats = ct.stats();
        assert!(
            stats.evicted_embryonic > 0 && stats.expired > 0 && stats.backend_gone > 0,
            "{stats:?}"
        );
    });
    let (found, busy) = (found.into_inner(), busy.into_inner());
    eprintln!("staying flows found without the lock {found} times, busy {busy} times");
    assert!(found > 0);
    t.lock().check_invariants();
}
