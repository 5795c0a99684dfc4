//! Connection tracking for NATed flows, shared by every data-path worker. A packet of a tracked
//! flow is looked up and accounted without a lock; only a flow's events (its first packet, a
//! change of state, its end) take the table's lock.
//!
//! An entry records a flow's original tuple (client -> VIP:port) and its NAT mapping (the
//! backend ip:port, and a source rewrite for the hairpin case where the client is the task
//! itself). Like Linux conntrack's original and reply tuples, it is indexed under two keys:
//! the original tuple and the reply tuple (backend -> client, or backend -> rewritten source),
//! so a packet in either direction finds the same entry with one look-up.
//!
//! The state is just enough to expire flows sensibly: for TCP, whether only the client has
//! spoken, the flow is established, FINs were seen (one way, both ways) or a RST was; for UDP,
//! whether the backend has replied. Each state has its timeout ([`Timeouts`]), counted from the
//! flow's last packet. Time is passed in, never read: [`Locked::poll_timeout`] says when the
//! next entry expires and [`Locked::handle_timeout`] expires it, at exactly its deadline.
//!
//! # Readers without a lock
//! As Linux's conntrack does with RCU, a look-up ([`Table::find`]) reads only atomics, and a
//! packet that leaves its flow in its state ([`Table::refresh`]: an established flow's data, a
//! UDP flow's next datagram) only raises the entry's last-seen time, with one atomic
//! `fetch_max`: there is no list to reorder, a deadline is the last-seen time plus the state's
//! timeout. A packet that changes the state (a SYN, a FIN, a RST, the first reply) goes
//! through [`Table::lock`], as do inserts, removals and the sweeps. So there is one writer at
//! a time, and any number of readers:
//! - Each entry sits in a slot of a fixed array: its tuple, NAT and state in a few atomic words
//!   under the slot's sequence counter (a seqlock). The writer makes the counter odd while it
//!   changes them; a reader that saw it odd, or changed, has read nothing.
//! - The index is an open-addressing table (linear probing, at most half full) of atomic
//!   words: a slot number, the key's direction and 32 bits of its hash. A hit is checked
//!   against the slot's own tuple, so a stale word costs a miss, never a wrong flow. A removal
//!   moves the following words back (no tombstones: probes stay short however much flows
//!   churn), and while it does a second counter is odd; a look-up that found nothing while
//!   words moved says so ([`Lookup::Busy`]) and the caller asks again under the lock.
//!
//! A reader that read a flow just before it was removed may still raise its slot's time: the
//! slot's next flow then lives that much longer, the same instant in practice. A sweep that
//! expires a flow while one of its packets is handled is the race every timeout has: that
//! packet was the flow's last.
//!
//! Capacity is fixed at construction and everything is allocated then ([`Table::new`]): 64
//! bytes a slot, and 4 to 8 index words of 8 bytes per slot. The sweeps scan the slots under
//! the lock: [`Locked::handle_timeout`] removes every entry past its deadline. When the table
//! is full, inserting evicts an embryonic entry (a TCP flow without reply, an unreplied UDP
//! flow) if there is one, else the entry idle longest; [`Stats`] counts both kinds. It looks
//! at [`EVICTION_RANGE`] slots at a time from a hand that goes round the table, and stops at
//! the first window with an embryonic entry (the one of those idle longest goes): under a SYN
//! flood every insert evicts, and a scan of the whole table under the lock made each spoofed
//! SYN cost thousands of slot reads while the shard's real flows waited (their replies then
//! found their entries gone). Going round, the hand comes back to a flow's window only after
//! every other window has had an eviction, so a new flow still outlives about a table's worth
//! of inserts, as with a scan of the whole table. Only a table full of replied flows, which an
//! attacker cannot fake cheaply, is scanned whole.
//!
//! When a backend is removed, [`Locked::remove_backend`] marks its entries
//! [`State::BackendGone`]: they stay long enough for the flow's next packets to find them and
//! be answered (a TCP RST, an ICMP unreachable), then expire.
//!
//! IPv4 only, like [`Tuple`].

use crate::Protocol;
use crate::flow::Tuple;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// TCP flag bits as they sit in the header's flags byte (RFC 9293 §3.1); [`Table::refresh`],
/// [`Locked::track`] and [`Locked::insert`] take that byte as it is (0 for UDP).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Slots an eviction compares at a time: a table no larger evicts exactly the entry of least
/// rank.
pub const EVICTION_RANGE: u32 = 32;

/// The largest capacity [`Capacity::new`] accepts: past this the memory (64 bytes a flow, and
/// 32 to 64 for the index) is not something a node should commit to.
pub const MAX_CAPACITY: u32 = 1 << 22;

/// Which way a packet goes relative to the flow's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to VIP, as the flow started.
    Original,
    /// Backend to client (or to the rewritten source).
    Reply,
}

/// Where a tracked flow was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat {
    /// The task address and port that replace the VIP destination.
    pub backend: SocketAddrV4,
    /// The source the backend sees instead of the client, when the client is the backend
    /// itself (Linux drops a packet from its own address arriving on eth0); `None` keeps the
    /// client's address.
    pub source: Option<SocketAddrV4>,
    /// Which way the flow's replies go.
    pub via: Via,
}

/// Which way a flow's replies go, and so what becomes of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Back over the overlay to a client on it (a VIP flow): un-NATed.
    Overlay,
    /// Out of this node's own stack, which handed over the flow's first packet (a published
    /// port): un-NATed, with the MACs that packet came with, swapped.
    Host {
        /// The client's (or its next hop's) MAC; all zero when the flow came over loopback.
        client_mac: [u8; 6],
        /// This node's MAC on the interface the flow came in on.
        node_mac: [u8; 6],
    },
    /// Back to the node at this underlay address, untouched: a published port's flow that
    /// entered there and was sent to a task here. That node un-NATs it.
    Node(Ipv4Addr),
}

/// A flow's state; each has its own timeout in [`Timeouts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Only the client has spoken: a SYN, or a flow picked up mid-stream. Embryonic.
    TcpSynSent,
    /// Both sides have spoken.
    TcpEstablished,
    /// One side has sent a FIN.
    TcpFinWait,
    /// Both sides have sent a FIN.
    TcpTimeWait,
    /// A RST was seen.
    TcpClose,
    /// Only the client has sent. Embryonic.
    UdpUnreplied,
    /// The backend has replied.
    UdpReplied,
    /// The backend was removed ([`Locked::remove_backend`]); the flow's packets should get a
    /// TCP RST or an ICMP unreachable. Packets no longer restart the timeout.
    BackendGone,
}

impl State {
    const COUNT: usize = 8;
    const ALL: [State; State::COUNT] = [
        State::TcpSynSent,
        State::TcpEstablished,
        State::TcpFinWait,
        State::TcpTimeWait,
        State::TcpClose,
        State::UdpUnreplied,
        State::UdpReplied,
        State::BackendGone,
    ];

    /// The state a record's byte holds; `None` for 0, a free slot.
    fn decode(byte: u8) -> Option<State> {
        State::ALL.get(usize::from(byte).checked_sub(1)?).copied()
    }

    /// Evicted first when the table is full: nobody has answered them yet.
    fn is_embryonic(self) -> bool {
        matches!(self, State::TcpSynSent | State::UdpUnreplied)
    }

    /// The state a flow's first packet (from the client) puts it in.
    fn first(proto: Protocol, flags: u8) -> (State, Fins) {
        match proto {
            Protocol::Tcp => State::TcpSynSent.after_tcp(Fins::NONE, Direction::Original, flags),
            Protocol::Udp => (State::UdpUnreplied, Fins::NONE),
        }
    }

    /// The state after a packet of a tracked flow.
    fn after(self, fins: Fins, dir: Direction, flags: u8) -> (State, Fins) {
        match self {
            State::BackendGone => (self, fins),
            State::UdpUnreplied | State::UdpReplied => match dir {
                Direction::Original => (self, fins),
                Direction::Reply => (State::UdpReplied, fins),
            },
            _ => self.after_tcp(fins, dir, flags),
        }
    }

    fn after_tcp(self, fins: Fins, dir: Direction, flags: u8) -> (State, Fins) {
        use tcp_flags::{ACK, FIN, RST, SYN};
        if flags & RST != 0 {
            return (State::TcpClose, fins);
        }
        // The client reusing the port of a finished connection starts afresh.
        let reopen = flags & (SYN | ACK) == SYN && dir == Direction::Original;
        if reopen && matches!(self, State::TcpTimeWait | State::TcpClose) {
            return (State::TcpSynSent, Fins::NONE);
        }
        let fins = if flags & FIN != 0 {
            fins.with(dir)
        } else {
            fins
        };
        let state = match self {
            State::TcpClose => State::TcpClose,
            _ if fins == Fins::BOTH => State::TcpTimeWait,
            _ if fins != Fins::NONE => State::TcpFinWait,
            State::TcpSynSent if dir == Direction::Reply => State::TcpEstablished,
            s => s,
        };
        (state, fins)
    }
}

/// Which directions have sent a FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fins(u8);

impl Fins {
    const NONE: Fins = Fins(0);
    const BOTH: Fins = Fins(3);

    fn with(self, dir: Direction) -> Fins {
        Fins(
            self.0
                | match dir {
                    Direction::Original => 1,
                    Direction::Reply => 2,
                },
        )
    }
}

/// How long a flow lives after its last packet, by state. The defaults are Linux's
/// (`net.netfilter.nf_conntrack_*_timeout*`), except `backend_gone`, which only needs to
/// outlast a client's retransmission so that it gets its reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: Duration,
    pub tcp_established: Duration,
    pub tcp_fin_wait: Duration,
    pub tcp_time_wait: Duration,
    pub tcp_close: Duration,
    pub udp_unreplied: Duration,
    pub udp_replied: Duration,
    pub backend_gone: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        let s = Duration::from_secs;
        Timeouts {
            tcp_syn_sent: s(120),
            tcp_established: s(5 * 24 * 3600),
            tcp_fin_wait: s(120),
            tcp_time_wait: s(120),
            tcp_close: s(10),
            udp_unreplied: s(30),
            udp_replied: s(120),
            backend_gone: s(30),
        }
    }
}

impl Timeouts {
    fn of(&self, state: State) -> Duration {
        match state {
            State::TcpSynSent => self.tcp_syn_sent,
            State::TcpEstablished => self.tcp_established,
            State::TcpFinWait => self.tcp_fin_wait,
            State::TcpTimeWait => self.tcp_time_wait,
            State::TcpClose => self.tcp_close,
            State::UdpUnreplied => self.udp_unreplied,
            State::UdpReplied => self.udp_replied,
            State::BackendGone => self.backend_gone,
        }
    }
}

/// A tracked flow, as it was when read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    record: Record,
    last_seen: Instant,
    deadline: Instant,
}

impl Entry {
    /// The flow as the client sent it: client -> VIP:port.
    pub fn original(&self) -> Tuple {
        self.record.original
    }

    /// The flow as the backend answers it: backend -> client (or the rewritten source).
    pub fn reply(&self) -> Tuple {
        self.record.reply()
    }

    pub fn nat(&self) -> Nat {
        self.record.nat
    }

    pub fn state(&self) -> State {
        self.record.state
    }

    /// True once the backend was removed: answer the flow with a RST or ICMP unreachable.
    pub fn is_backend_gone(&self) -> bool {
        self.record.state == State::BackendGone
    }

    /// When its last packet was seen.
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// When the entry expires unless a packet comes first.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

fn reply_of(original: &Tuple, nat: &Nat) -> Tuple {
    Tuple {
        proto: original.proto,
        src: nat.backend,
        dst: nat.source.unwrap_or(original.src),
    }
}

/// Counters, monotonic over the table's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Entries removed at their deadline.
    pub expired: u64,
    /// Embryonic entries evicted to make room.
    pub evicted_embryonic: u64,
    /// Other entries evicted to make room (no embryonic entry was left).
    pub evicted_oldest: u64,
    /// Entries marked [`State::BackendGone`].
    pub backend_gone: u64,
}

/// Why a flow was not tracked, or a table not built. The table is unchanged in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The capacity is 0 or above [`MAX_CAPACITY`]. No table was built.
    #[error("a conntrack capacity must be between 1 and {MAX_CAPACITY}, not {0}")]
    Capacity(u32),
    /// The tuple is already tracked, in the given direction: look it up instead.
    #[error("the flow is already tracked ({0:?} direction)")]
    Exists(Direction),
    /// The reply tuple is already another flow's: the backend could not tell their replies
    /// apart. The NAT must choose another source port (or drop the packet).
    #[error("another tracked flow has the same reply tuple")]
    ReplyClash,
}

/// How many flows a table holds: 1 to [`MAX_CAPACITY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity(u32);

impl Capacity {
    pub fn new(flows: u32) -> Result<Capacity, Error> {
        if flows == 0 || flows > MAX_CAPACITY {
            return Err(Error::Capacity(flows));
        }
        Ok(Capacity(flows))
    }
}

/// What a look-up without the lock found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The flow of the tuple.
    Found(Found),
    /// No flow has the tuple.
    Absent,
    /// The writer was changing what the look-up read: ask again under [`Table::lock`].
    Busy,
}

/// A tracked flow found by [`Table::find`]: a copy of its entry, and the packet's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub direction: Direction,
    pub entry: Entry,
    slot: u32,
}

/// Everything a slot says of its flow except the last-seen time: what changes only under the
/// lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    original: Tuple,
    nat: Nat,
    state: State,
    fins: Fins,
}

/// The atomic words a record takes in a slot.
const WORDS: usize = 6;
/// Where in those words' bytes the state is: a sweep reads it alone.
const STATE_BYTE: usize = 39;

impl Record {
    fn reply(&self) -> Tuple {
        reply_of(&self.original, &self.nat)
    }

    /// The record as bytes, in words: the protocol, the original source and destination, the
    /// backend, the source rewrite (a flag and an address), the way back (a tag and up to 12
    /// bytes), the state (0 is a free slot) and the FINs.
    fn encode(&self) -> [u64; WORDS] {
        let mut b = [0u8; WORDS * 8];
        b[0] = match self.original.proto {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        };
        put(&mut b[1..7], self.original.src);
        put(&mut b[7..13], self.original.dst);
        put(&mut b[13..19], self.nat.backend);
        if let Some(source) = self.nat.source {
            b[19] = 1;
            put(&mut b[20..26], source);
        }
        match self.nat.via {
            Via::Overlay => {}
            Via::Host {
                client_mac,
                node_mac,
            } => {
                b[26] = 1;
                b[27..33].copy_from_slice(&client_mac);
                b[33..39].copy_from_slice(&node_mac);
            }
            Via::Node(node) => {
                b[26] = 2;
                b[27..31].copy_from_slice(&node.octets());
            }
        }
        b[STATE_BYTE] = 1 + self.state as u8;
        b[40] = self.fins.0;
        let (words, _) = b.as_chunks::<8>();
        std::array::from_fn(|i| u64::from_le_bytes(words[i]))
    }

    /// The record `encode` made, or `None` for a free slot.
    fn decode(words: [u64; WORDS]) -> Option<Record> {
        let mut b = [0u8; WORDS * 8];
        for (chunk, word) in b.as_chunks_mut::<8>().0.iter_mut().zip(words) {
            *chunk = word.to_le_bytes();
        }
        let state = State::decode(b[STATE_BYTE])?;
        let mac = |at: usize| -> [u8; 6] { std::array::from_fn(|i| b[at + i]) };
        Some(Record {
            original: Tuple {
                proto: if b[0] == 6 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                src: get(&b[1..7]),
                dst: get(&b[7..13]),
            },
            nat: Nat {
                backend: get(&b[13..19]),
                source: (b[19] == 1).then(|| get(&b[20..26])),
                via: match b[26] {
                    1 => Via::Host {
                        client_mac: mac(27),
                        node_mac: mac(33),
                    },
                    2 => Via::Node(get(&b[27..33]).ip().to_owned()),
                    _ => Via::Overlay,
                },
            },
            state,
            fins: Fins(b[40]),
        })
    }
}

/// Writes an address and port into 6 bytes.
fn put(b: &mut [u8], addr: SocketAddrV4) {
    b[..4].copy_from_slice(&addr.ip().octets());
    b[4..6].copy_from_slice(&addr.port().to_be_bytes());
}

/// Reads an address and port from 6 bytes.
fn get(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    )
}

/// One entry's place: 64 bytes.
#[derive(Debug, Default)]
struct Slot {
    /// Odd while the writer changes `words`.
    seq: AtomicU64,
    /// The encoded [`Record`]; all 0 when the slot is free.
    words: [AtomicU64; WORDS],
    /// Nanoseconds from the table's epoch to the flow's last packet. Readers raise it.
    seen: AtomicU64,
}

/// A read of a slot that overlapped the writer's change of it.
struct Torn;

/// An index word: the low 32 bits of the key's hash (whose low bits are its home position),
/// the key's direction, and the slot number plus 1, so that no word is 0, the empty one.
fn index_word(hash: u64, slot: u32, direction: Direction) -> u64 {
    (hash & 0xffff_ffff) << 32
        | u64::from(direction == Direction::Reply) << 31
        | u64::from(slot + 1)
}

/// The hash bits an index word keeps.
fn word_hash(word: u64) -> u64 {
    word >> 32
}

fn word_slot(word: u64) -> u32 {
    (word & 0x7fff_ffff) as u32 - 1
}

/// The connection-tracking table: read by any number of workers at once without a lock
/// ([`Table::find`], [`Table::refresh`]), changed by one at a time ([`Table::lock`]).
#[derive(Debug)]
pub struct Table {
    slots: Box<[Slot]>,
    /// Two words per entry, one per tuple, at most half full; 0 is empty.
    index: Box<[AtomicU64]>,
    /// Odd while the writer moves index words back after a removal.
    shifting: AtomicU64,
    /// The index's hash: randomly keyed, as clients choose the tuples.
    hasher: RandomState,
    /// Time 0 of the slots' last-seen times; an earlier time counts as this one.
    epoch: Instant,
    timeouts: Timeouts,
    writer: Mutex<Writer>,
}

/// What only the writer touches.
#[derive(Debug)]
struct Writer {
    /// Free slots, as a stack that never holds more than the capacity.
    free: Vec<u32>,
    len: u32,
    /// The first slot the next eviction looks at.
    hand: u32,
    stats: Stats,
}

impl Table {
    /// A table for `capacity` flows, with all its memory allocated now. The index has 4 to 8
    /// words per slot, two per flow: at most half full, linear probing stays short.
    pub fn new(capacity: Capacity, timeouts: Timeouts, epoch: Instant) -> Table {
        let slots = capacity.0 as usize;
        Table {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            index: (0..(4 * slots).next_power_of_two())
                .map(|_| AtomicU64::new(0))
                .collect(),
            shifting: AtomicU64::new(0),
            hasher: RandomState::new(),
            epoch,
            timeouts,
            writer: Mutex::new(Writer {
                free: (0..capacity.0).rev().collect(),
                len: 0,
                hand: 0,
                stats: Stats::default(),
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The flow a packet with this tuple belongs to, and the packet's direction, read without
    /// a lock and changing nothing. [`Lookup::Busy`] if the writer was in the way.
    pub fn find(&self, tuple: &Tuple) -> Lookup {
        let shifting = self.shifting.load(Ordering::Acquire);
        match self.probe(tuple) {
            Lookup::Absent => {
                // Nothing found: true only if no word moved meanwhile.
                fence(Ordering::Acquire);
                if shifting.is_multiple_of(2) && self.shifting.load(Ordering::Relaxed) == shifting {
                    Lookup::Absent
                } else {
                    Lookup::Busy
                }
            }
            found_or_busy => found_or_busy,
        }
    }

    /// Accounts a packet of `found`'s flow without a lock, if the packet leaves the flow in its
    /// state: restarts its timeout (unless its backend is gone, see [`State::BackendGone`]) and
    /// returns the entry as it is now. `None` if the packet changes the flow's state, which is
    /// [`Locked::track`]'s to do.
    pub fn refresh(&self, found: &Found, now: Instant, tcp_flags: u8) -> Option<Entry> {
        let Record { state, fins, .. } = found.entry.record;
        if state == State::BackendGone {
            return Some(found.entry);
        }
        if state.after(fins, found.direction, tcp_flags) != (state, fins) {
            return None;
        }
        let seen = self.touch(found.slot, now);
        Some(self.entry(found.entry.record, seen))
    }

    /// The task address of every flow in the table, read as the lock-free readers read (a
    /// slot being written just then is passed over): for metrics, which must not hold up the
    /// flows' events. A walk of the whole table.
    pub fn backends(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (0..self.slots.len() as u32)
            .filter_map(|slot| self.read(slot).ok().flatten())
            .map(|record| *record.nat.backend.ip())
    }

    /// The table for changes, one writer at a time. A writer that panicked left it consistent
    /// (no change unwinds halfway), so it is used as it is.
    pub fn lock(&self) -> Locked<'_> {
        Locked {
            table: self,
            writer: self.writer.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Looks `tuple` up; [`Lookup::Absent`] only means that no word it read led to the flow.
    fn probe(&self, tuple: &Tuple) -> Lookup {
        let hash = self.hasher.hash_one(tuple);
        let mask = self.index.len() - 1;
        let mut at = hash as usize & mask;
        for _ in 0..self.index.len() {
            let word = self.index[at].load(Ordering::Acquire);
            if word == 0 {
                return Lookup::Absent;
            }
            if word_hash(word) == hash & 0xffff_ffff {
                let slot = word_slot(word);
                let Ok(record) = self.read(slot) else {
                    return Lookup::Busy;
                };
                let direction = record.and_then(|r| {
                    if r.original == *tuple {
                        Some(Direction::Original)
                    } else {
                        (r.reply() == *tuple).then_some(Direction::Reply)
                    }
                });
                if let (Some(direction), Some(record)) = (direction, record) {
                    let seen = self.slots[slot as usize].seen.load(Ordering::Relaxed);
                    return Lookup::Found(Found {
                        direction,
                        entry: self.entry(record, seen),
                        slot,
                    });
                }
            }
            at = (at + 1) & mask;
        }
        // Only words moving under the probe can make it go round.
        Lookup::Busy
    }

    /// The record in `slot` (`None` if the slot is free), read as the seqlock reader does.
    fn read(&self, slot: u32) -> Result<Option<Record>, Torn> {
        let s = &self.slots[slot as usize];
        let before = s.seq.load(Ordering::Acquire);
        let words = std::array::from_fn(|i| s.words[i].load(Ordering::Relaxed));
        fence(Ordering::Acquire);
        if before % 2 == 1 || s.seq.load(Ordering::Relaxed) != before {
            return Err(Torn);
        }
        Ok(Record::decode(words))
    }

    /// Writes `slot`'s words as the seqlock writer does. Only under the lock.
    fn write(&self, slot: u32, words: [u64; WORDS]) {
        let s = &self.slots[slot as usize];
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (word, value) in s.words.iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        s.seq.store(seq + 2, Ordering::Release);
    }

    /// Raises `slot`'s last-seen time to `now`; returns the time it has now.
    fn touch(&self, slot: u32, now: Instant) -> u64 {
        let now = self.nanos(now);
        self.slots[slot as usize]
            .seen
            .fetch_max(now, Ordering::Relaxed)
            .max(now)
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn time(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    fn entry(&self, record: Record, seen: u64) -> Entry {
        let last_seen = self.time(seen);
        Entry {
            record,
            last_seen,
            deadline: last_seen + self.timeouts.of(record.state),
        }
    }

    /// Adds `tuple`'s word for `slot` to the index. Only under the lock; the index is at most
    /// half full, so there is an empty word to take.
    fn link(&self, tuple: &Tuple, slot: u32, direction: Direction) {
        let hash = self.hasher.hash_one(tuple);
        let mask = self.index.len() - 1;
        let mut at = hash as usize & mask;
        while self.index[at].load(Ordering::Relaxed) != 0 {
            at = (at + 1) & mask;
        }
        self.index[at].store(index_word(hash, slot, direction), Ordering::Release);
    }

    /// Removes `tuple`'s word for `slot` from the index, and moves back the words after it that
    /// can be found from their home without the gap (Knuth's algorithm R), while `shifting`
    /// is odd. Only under the lock.
    fn unlink(&self, tuple: &Tuple, slot: u32, direction: Direction) {
        let hash = self.hasher.hash_one(tuple);
        let target = index_word(hash, slot, direction);
        let mask = self.index.len() - 1;
        let mut hole = hash as usize & mask;
        loop {
            match self.index[hole].load(Ordering::Relaxed) {
                0 => return,
                word if word == target => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        let shifting = self.shifting.load(Ordering::Relaxed);
        self.shifting.store(shifting + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let word = self.index[at].load(Ordering::Relaxed);
            if word == 0 {
                break;
            }
            // The word may fill the hole unless its home lies after the hole, up to here.
            let home = word_hash(word) as usize & mask;
            if at.wrapping_sub(home) & mask >= at.wrapping_sub(hole) & mask {
                self.index[hole].store(word, Ordering::Release);
                hole = at;
            }
        }
        self.index[hole].store(0, Ordering::Release);
        self.shifting.store(shifting + 2, Ordering::Release);
    }
}

/// The table with its writer's lock held: flow events, the sweeps, and the counters.
pub struct Locked<'a> {
    table: &'a Table,
    writer: MutexGuard<'a, Writer>,
}

impl Locked<'_> {
    pub fn len(&self) -> usize {
        self.writer.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.writer.len == 0
    }

    pub fn stats(&self) -> Stats {
        self.writer.stats
    }

    /// The entry a packet with this tuple belongs to, and the packet's direction. Changes
    /// nothing.
    pub fn get(&self, tuple: &Tuple) -> Option<(Direction, Entry)> {
        self.found(tuple).map(|f| (f.direction, f.entry))
    }

    /// Accounts a packet of a tracked flow: advances its state by the TCP flags (ignored for
    /// UDP) and restarts its timeout. `None` if the tuple is not tracked.
    pub fn track(
        &mut self,
        now: Instant,
        tuple: &Tuple,
        tcp_flags: u8,
    ) -> Option<(Direction, Entry)> {
        let found = self.found(tuple)?;
        if let Some(entry) = self.table.refresh(&found, now, tcp_flags) {
            return Some((found.direction, entry));
        }
        let record = found.entry.record;
        let (state, fins) = record.state.after(record.fins, found.direction, tcp_flags);
        let record = Record {
            state,
            fins,
            ..record
        };
        self.table.write(found.slot, record.encode());
        let seen = self.table.touch(found.slot, now);
        Some((found.direction, self.table.entry(record, seen)))
    }

    /// Starts tracking a flow from its first packet (`original`, client -> VIP:port) and the
    /// NAT chosen for it. When the table is full, another entry is evicted first.
    pub fn insert(
        &mut self,
        now: Instant,
        original: Tuple,
        nat: Nat,
        tcp_flags: u8,
    ) -> Result<Entry, Error> {
        let reply = reply_of(&original, &nat);
        if let Some(found) = self.found(&original) {
            return Err(Error::Exists(found.direction));
        }
        if reply == original || self.found(&reply).is_some() {
            return Err(Error::ReplyClash);
        }
        let slot = match self.writer.free.pop() {
            Some(slot) => slot,
            None => self.evict(),
        };
        let (state, fins) = State::first(original.proto, tcp_flags);
        let record = Record {
            original,
            nat,
            state,
            fins,
        };
        let seen = self.table.nanos(now);
        self.table.slots[slot as usize]
            .seen
            .store(seen, Ordering::Relaxed);
        self.table.write(slot, record.encode());
        self.table.link(&original, slot, Direction::Original);
        self.table.link(&reply, slot, Direction::Reply);
        self.writer.len += 1;
        Ok(self.table.entry(record, seen))
    }

    /// Marks every flow sent to `backend` (a task address, any port) as
    /// [`State::BackendGone`], to expire after [`Timeouts::backend_gone`]. Returns how many
    /// were marked. A control-plane event, not per packet: it walks the whole table.
    pub fn remove_backend(&mut self, now: Instant, backend: Ipv4Addr) -> usize {
        let mut marked = 0;
        for slot in self.live() {
            let Some(record) = self.record(slot) else {
                continue;
            };
            if *record.nat.backend.ip() == backend && record.state != State::BackendGone {
                let gone = Record {
                    state: State::BackendGone,
                    ..record
                };
                self.table.write(slot, gone.encode());
                self.table.touch(slot, now);
                marked += 1;
            }
        }
        self.writer.stats.backend_gone += marked as u64;
        marked
    }

    /// Stops tracking the flow `tuple` belongs to (either direction); false if none does.
    pub fn forget(&mut self, tuple: &Tuple) -> bool {
        match self.found(tuple) {
            Some(found) => {
                self.remove(found.slot);
                true
            }
            None => false,
        }
    }

    /// When the next entry expires, if any. A scan of the table.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.live().filter_map(|slot| self.deadline(slot)).min()
    }

    /// Removes every entry whose deadline is at or before `now`. A scan of the table.
    pub fn handle_timeout(&mut self, now: Instant) {
        for slot in self.live() {
            if self.deadline(slot).is_some_and(|deadline| deadline <= now) {
                self.remove(slot);
                self.writer.stats.expired += 1;
            }
        }
    }

    /// The slots to scan: none at all in an empty table.
    fn live(&self) -> std::ops::Range<u32> {
        let end = if self.is_empty() {
            0
        } else {
            self.table.slots.len() as u32
        };
        0..end
    }

    /// Under the lock a look-up is never [`Lookup::Busy`]: nothing changes under it.
    fn found(&self, tuple: &Tuple) -> Option<Found> {
        match self.table.probe(tuple) {
            Lookup::Found(found) => Some(found),
            Lookup::Absent | Lookup::Busy => None,
        }
    }

    fn record(&self, slot: u32) -> Option<Record> {
        self.table.read(slot).ok().flatten()
    }

    /// The state of the flow in `slot`, `None` if the slot is free: its byte alone, which only
    /// the writer changes.
    fn state(&self, slot: u32) -> Option<State> {
        let word = self.table.slots[slot as usize].words[STATE_BYTE / 8].load(Ordering::Relaxed);
        State::decode(word.to_le_bytes()[STATE_BYTE % 8])
    }

    fn seen(&self, slot: u32) -> u64 {
        self.table.slots[slot as usize].seen.load(Ordering::Relaxed)
    }

    fn deadline(&self, slot: u32) -> Option<Instant> {
        let state = self.state(slot)?;
        Some(self.table.time(self.seen(slot)) + self.table.timeouts.of(state))
    }

    /// Frees `slot`: out of the index first, so that a reader that still reaches it finds it
    /// free.
    fn remove(&mut self, slot: u32) {
        self.vacate(slot);
        self.writer.free.push(slot);
    }

    fn vacate(&mut self, slot: u32) {
        let Some(record) = self.record(slot) else {
            return;
        };
        self.table
            .unlink(&record.original, slot, Direction::Original);
        self.table.unlink(&record.reply(), slot, Direction::Reply);
        self.table.write(slot, [0; WORDS]);
        self.writer.len -= 1;
    }

    /// Empties the slot of an embryonic entry, else of the entry idle longest (the table is
    /// full, every slot holds one), and returns it. It looks [`EVICTION_RANGE`] slots at a
    /// time from the hand, moving the hand past them, until a window holds an embryonic entry
    /// (then the one of those idle longest goes) or it has been round the whole table.
    fn evict(&mut self) -> u32 {
        let slots = self.table.slots.len() as u32;
        // Sorts embryonic entries first, then by last packet; a free slot is no candidate.
        let rank = |slot: u32| match self.state(slot) {
            Some(state) => (!state.is_embryonic(), self.seen(slot)),
            None => (true, u64::MAX),
        };
        let (mut hand, mut looked) = (self.writer.hand, 0);
        let mut victim = hand;
        while looked < slots {
            let range = EVICTION_RANGE.min(slots - looked);
            victim = (hand..hand + range)
                .map(|slot| slot % slots)
                .chain([victim])
                .min_by_key(|&slot| rank(slot))
                .expect("the chain holds the victim so far");
            hand = (hand + range) % slots;
            looked += range;
            if !rank(victim).0 {
                break;
            }
        }
        let embryonic = !rank(victim).0;
        self.writer.hand = hand;
        if embryonic {
            self.writer.stats.evicted_embryonic += 1;
        } else {
            self.writer.stats.evicted_oldest += 1;
        }
        self.vacate(victim);
        victim
    }
}

#[cfg(test)]
mod tests;
