//! Connection tracking for NATed flows, owned by one data-path worker (no locks).
//!
//! An entry records a flow's original tuple (client -> VIP:port) and its NAT mapping (the
//! backend ip:port, and a source rewrite for the hairpin case where the client is the task
//! itself). Like Linux conntrack's original and reply tuples, it is indexed under two keys:
//! the original tuple and the reply tuple (backend -> client, or backend -> rewritten source),
//! so a packet in either direction finds the same entry with one hash lookup.
//!
//! The state is just enough to expire flows sensibly: for TCP, whether only the client has
//! spoken, the flow is established, FINs were seen (one way, both ways) or a RST was; for UDP,
//! whether the backend has replied. Each state has its timeout ([`Timeouts`]); every packet
//! restarts it. Time is passed in, never read: [`Table::poll_timeout`] says when the next
//! entry expires and [`Table::handle_timeout`] expires it, at exactly its deadline.
//!
//! Capacity is fixed at construction and everything is allocated then: a slab of entries, and
//! the index reserved large enough never to grow (see [`Table::new`]). Entries of one state
//! sit in a list in the order they were last touched; as a state's timeout is constant, that
//! is also deadline order, so the next deadline is the earliest of the lists' heads, and a
//! packet moves its entry to a list's tail in O(1). When the table is full, inserting evicts
//! an embryonic entry (a TCP flow without reply, an unreplied UDP flow), the one idle longest,
//! else the entry idle longest of all; [`Stats`] counts both kinds.
//!
//! When a backend is removed, [`Table::remove_backend`] marks its entries
//! [`State::BackendGone`]: they stay long enough for the flow's next packets to find them and
//! be answered (a TCP RST, an ICMP unreachable), then expire.
//!
//! IPv4 only, like [`Tuple`].

use crate::Protocol;
use crate::flow::Tuple;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// TCP flag bits as they sit in the header's flags byte (RFC 9293 §3.1); [`Table::track`]
/// and [`Table::insert`] take that byte as it is (0 for UDP).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The largest capacity [`Table::new`] accepts: slot numbers are `u32`, and past this the
/// memory (about 200 bytes a flow with the index) is not something a node should commit to.
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
    /// The backend was removed ([`Table::remove_backend`]); the flow's packets should get a
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

    /// Evicted first when the table is full: nobody has answered them yet.
    fn is_embryonic(self) -> bool {
        matches!(self, State::TcpSynSent | State::UdpUnreplied)
    }

    fn list(self) -> usize {
        self as usize
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

/// A tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    original: Tuple,
    nat: Nat,
    state: State,
    fins: Fins,
    last_seen: Instant,
    deadline: Instant,
}

impl Entry {
    /// The flow as the client sent it: client -> VIP:port.
    pub fn original(&self) -> Tuple {
        self.original
    }

    /// The flow as the backend answers it: backend -> client (or the rewritten source).
    pub fn reply(&self) -> Tuple {
        reply_of(&self.original, &self.nat)
    }

    pub fn nat(&self) -> Nat {
        self.nat
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// True once the backend was removed: answer the flow with a RST or ICMP unreachable.
    pub fn is_backend_gone(&self) -> bool {
        self.state == State::BackendGone
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

/// Why a flow was not tracked. The table is unchanged in every case.
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

/// "No slot": the end of a list.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    entry: Option<Entry>,
    /// Neighbours in the entry's state list; for a free slot, `next` chains the free list.
    prev: u32,
    next: u32,
}

#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
}

/// The connection-tracking table of one worker.
#[derive(Debug)]
pub struct Table {
    slots: Box<[Slot]>,
    /// Both tuples of every entry, to its slot.
    index: HashMap<Tuple, (u32, Direction)>,
    lists: [List; State::COUNT],
    free: u32,
    len: u32,
    timeouts: Timeouts,
    /// The latest time seen: time never goes back inside the table, which keeps every list in
    /// deadline order even if a caller's clock did.
    latest: Option<Instant>,
    stats: Stats,
}

impl Table {
    /// A table for `capacity` flows, with all its memory allocated now. The index holds two
    /// keys a flow and is reserved for twice that: std's hash map then always has room to
    /// reuse deleted buckets in place (it rehashes without allocating while at most half
    /// full), so churn never makes it reallocate.
    pub fn new(capacity: u32, timeouts: Timeouts) -> Result<Table, Error> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::Capacity(capacity));
        }
        let slots = (0..capacity)
            .map(|i| Slot {
                entry: None,
                prev: NIL,
                next: if i + 1 < capacity { i + 1 } else { NIL },
            })
            .collect();
        Ok(Table {
            slots,
            index: HashMap::with_capacity(4 * capacity as usize),
            lists: [List {
                head: NIL,
                tail: NIL,
            }; State::COUNT],
            free: 0,
            len: 0,
            timeouts,
            latest: None,
            stats: Stats::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The entry a packet with this tuple belongs to, and the packet's direction. Changes
    /// nothing.
    pub fn get(&self, tuple: &Tuple) -> Option<(Direction, &Entry)> {
        let &(slot, dir) = self.index.get(tuple)?;
        let entry = self.slot(slot).entry.as_ref()?;
        Some((dir, entry))
    }

    /// Accounts a packet of a tracked flow: advances its state by the TCP flags (ignored for
    /// UDP) and restarts its timeout. `None` if the tuple is not tracked.
    pub fn track(
        &mut self,
        now: Instant,
        tuple: &Tuple,
        tcp_flags: u8,
    ) -> Option<(Direction, Entry)> {
        let now = self.clock(now);
        let &(slot, dir) = self.index.get(tuple)?;
        let entry = self.slot(slot).entry?;
        if entry.is_backend_gone() {
            return Some((dir, entry));
        }
        let (state, fins) = entry.state.after(entry.fins, dir, tcp_flags);
        self.relist(slot, now, state, fins);
        self.slot(slot).entry.map(|e| (dir, e))
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
        if let Some(&(_, dir)) = self.index.get(&original) {
            return Err(Error::Exists(dir));
        }
        if reply == original || self.index.contains_key(&reply) {
            return Err(Error::ReplyClash);
        }
        let now = self.clock(now);
        if self.free == NIL {
            self.evict();
        }
        let slot = self.free;
        self.free = self.slot(slot).next;
        let (state, fins) = State::first(original.proto, tcp_flags);
        let entry = Entry {
            original,
            nat,
            state,
            fins,
            last_seen: now,
            deadline: now + self.timeouts.of(state),
        };
        self.slots[slot as usize].entry = Some(entry);
        self.link(slot, now, state, fins);
        self.index.insert(original, (slot, Direction::Original));
        self.index.insert(reply, (slot, Direction::Reply));
        self.len += 1;
        Ok(entry)
    }

    /// Marks every flow sent to `backend` (a task address, any port) as
    /// [`State::BackendGone`], to expire after [`Timeouts::backend_gone`]. Returns how many
    /// were marked. A control-plane event, not per packet: it walks the whole table.
    pub fn remove_backend(&mut self, now: Instant, backend: Ipv4Addr) -> usize {
        let now = self.clock(now);
        let mut marked = 0;
        for slot in 0..self.slots.len() as u32 {
            let Some(entry) = self.slot(slot).entry else {
                continue;
            };
            if *entry.nat.backend.ip() == backend && !entry.is_backend_gone() {
                self.unlink(slot);
                self.link(slot, now, State::BackendGone, entry.fins);
                marked += 1;
            }
        }
        self.stats.backend_gone += marked as u64;
        marked
    }

    /// Stops tracking the flow `tuple` belongs to (either direction); false if none does.
    pub fn forget(&mut self, tuple: &Tuple) -> bool {
        match self.index.get(tuple) {
            Some(&(slot, _)) => {
                self.remove(slot);
                true
            }
            None => false,
        }
    }

    /// When the next entry expires, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lists
            .iter()
            .filter_map(|l| self.deadline(l.head))
            .min()
    }

    /// Removes every entry whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.clock(now);
        for list in 0..State::COUNT {
            while let Some(deadline) = self.deadline(self.lists[list].head) {
                if deadline > now {
                    break;
                }
                let head = self.lists[list].head;
                self.remove(head);
                self.stats.expired += 1;
            }
        }
    }

    fn clock(&mut self, now: Instant) -> Instant {
        let now = self.latest.map_or(now, |l| l.max(now));
        self.latest = Some(now);
        now
    }

    fn slot(&self, slot: u32) -> &Slot {
        &self.slots[slot as usize]
    }

    fn deadline(&self, slot: u32) -> Option<Instant> {
        self.slots.get(slot as usize)?.entry.map(|e| e.deadline)
    }

    fn last_seen(&self, slot: u32) -> Option<Instant> {
        self.slots.get(slot as usize)?.entry.map(|e| e.last_seen)
    }

    /// Moves an entry to the tail of its (new) state's list after a packet at `now`.
    fn relist(&mut self, slot: u32, now: Instant, state: State, fins: Fins) {
        self.unlink(slot);
        self.link(slot, now, state, fins);
    }

    /// Sets the entry's state and times, and appends it to its state's list: `now` is the
    /// latest time, so the list stays in deadline order.
    fn link(&mut self, slot: u32, now: Instant, state: State, fins: Fins) {
        let deadline = now + self.timeouts.of(state);
        let list = &mut self.lists[state.list()];
        let tail = list.tail;
        list.tail = slot;
        if tail == NIL {
            list.head = slot;
        } else {
            self.slots[tail as usize].next = slot;
        }
        let s = &mut self.slots[slot as usize];
        s.prev = tail;
        s.next = NIL;
        if let Some(e) = &mut s.entry {
            e.state = state;
            e.fins = fins;
            e.last_seen = now;
            e.deadline = deadline;
        }
    }

    fn unlink(&mut self, slot: u32) {
        let Some(entry) = self.slot(slot).entry else {
            return;
        };
        let Slot { prev, next, .. } = *self.slot(slot);
        let list = &mut self.lists[entry.state.list()];
        if prev == NIL {
            list.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn remove(&mut self, slot: u32) {
        let Some(entry) = self.slot(slot).entry else {
            return;
        };
        self.unlink(slot);
        self.index.remove(&entry.original);
        self.index.remove(&entry.reply());
        let s = &mut self.slots[slot as usize];
        s.entry = None;
        s.prev = NIL;
        s.next = self.free;
        self.free = slot;
        self.len -= 1;
    }

    /// Frees one slot: the embryonic entry idle longest, else the entry idle longest. Each
    /// list's head is its entry idle longest.
    fn evict(&mut self) {
        let oldest = |embryonic_only: bool| {
            State::ALL
                .iter()
                .filter(|s| !embryonic_only || s.is_embryonic())
                .map(|s| self.lists[s.list()].head)
                .filter_map(|slot| Some((self.last_seen(slot)?, slot)))
                .min()
                .map(|(_, slot)| slot)
        };
        if let Some(slot) = oldest(true) {
            self.remove(slot);
            self.stats.evicted_embryonic += 1;
        } else if let Some(slot) = oldest(false) {
            self.remove(slot);
            self.stats.evicted_oldest += 1;
        }
    }
}

#[cfg(test)]
mod tests;
