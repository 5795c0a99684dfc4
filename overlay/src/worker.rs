//! One data-path thread: polls its TAP queues and its VXLAN socket, runs the switch, and
//! does the I/O the switch asks for.
//!
//! Per packet there is no lock and no allocation: tables are read through an atomic pointer,
//! frames are read into a buffer with headroom so the VXLAN header is written in place in
//! front of the frame (and the vnet header in place of the VXLAN header on the way back),
//! and counters are relaxed atomics read by [`DataPlane::stats`](crate::DataPlane::stats).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::fdb::{Index, Learned};
use crate::switch::{self, DropReason, Forward};
use crate::udp::SendPool;
use crate::vxlan::{self, Vni};
use crate::{flowhash, tap, vnet};

/// Messages from the control side; each is followed by a wake-up.
pub(crate) enum Control {
    /// Serve this queue of the network's TAP.
    AddQueue { vni: Vni, queue: tap::Queue },
    /// Close the network's queue and forget what was learned on it, then acknowledge.
    Remove { vni: Vni, done: mpsc::Sender<()> },
    /// Exit the loop.
    Shutdown,
}

/// Per-worker counters, summed by `DataPlane::stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub rx_frames: AtomicU64,
    pub tx_vxlan: AtomicU64,
    pub rx_vxlan: AtomicU64,
    pub arp_answered: AtomicU64,
    pub flooded: AtomicU64,
    pub drops: [AtomicU64; DROP_REASONS],
}

pub(crate) const DROP_REASONS: usize = 14;
const _: () = assert!(switch::DropReason::ALL.len() == DROP_REASONS);

impl Counters {
    fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    fn drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Relaxed);
    }
}

pub(crate) const WAKER: Token = Token(0);
const UDP: Token = Token(1);
const FIRST_TAP: usize = 2;

/// Packets handled from one source before looking at the others.
const BUDGET: usize = 64;
/// Largest frame (plus vnet header) read from a TAP, and largest datagram received.
const BUF_LEN: usize = 65_536 + 64;
/// Headroom before a TAP frame: the vnet header, which the VXLAN header then overwrites.
const TAP_HEADROOM: usize = vnet::HEADER_LEN;
/// Offset at which a VXLAN datagram is received, so its header ends where a vnet header would.
const UDP_OFFSET: usize = vnet::HEADER_LEN - vxlan::HEADER_LEN;

const ZERO_VNET: [u8; vnet::HEADER_LEN] = [0; vnet::HEADER_LEN];

struct TapSlot {
    vni: Vni,
    queue: tap::Queue,
}

pub(crate) struct Worker {
    pub poll: Poll,
    pub control: mpsc::Receiver<Control>,
    pub udp: UdpSocket,
    pub pool: Arc<SendPool>,
    pub tables: Arc<ArcSwap<Index>>,
    pub counters: Arc<Counters>,
}

struct State {
    taps: Vec<Option<TapSlot>>,
    by_vni: HashMap<Vni, usize>,
    learned: Learned,
    buf: Box<[u8]>,
    reply: Box<[u8]>,
}

impl Worker {
    /// Runs until [`Control::Shutdown`] or until the control side is gone.
    pub fn run(self) {
        let Worker {
            mut poll,
            control,
            udp,
            pool,
            tables,
            counters,
        } = self;
        if let Err(e) =
            poll.registry()
                .register(&mut SourceFd(&udp.as_raw_fd()), UDP, Interest::READABLE)
        {
            tracing::error!(error = %e, "registering VXLAN socket; worker exits");
            return;
        }
        let mut st = State {
            taps: Vec::new(),
            by_vni: HashMap::new(),
            learned: Learned::default(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            reply: vec![0u8; 128].into_boxed_slice(),
        };
        let io = Io {
            udp: &udp,
            pool: &pool,
            tables: &tables,
            counters: &counters,
        };
        let mut events = Events::with_capacity(256);
        let mut pending: Vec<Token> = Vec::with_capacity(16);
        let mut next: Vec<Token> = Vec::with_capacity(16);
        loop {
            let timeout = if pending.is_empty() {
                None
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "poll failed; worker exits");
                return;
            }
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    if !handle_control(&poll, &control, &mut st) {
                        return;
                    }
                } else if !pending.contains(&t) {
                    pending.push(t);
                }
            }
            next.clear();
            for &t in &pending {
                let more = if t == UDP {
                    io.on_udp(&mut st)
                } else {
                    io.on_tap(&mut st, t.0 - FIRST_TAP)
                };
                if more {
                    next.push(t);
                }
            }
            std::mem::swap(&mut pending, &mut next);
        }
    }
}

/// Applies queued control messages. Returns false on shutdown.
fn handle_control(poll: &Poll, control: &mpsc::Receiver<Control>, st: &mut State) -> bool {
    loop {
        match control.try_recv() {
            Ok(Control::AddQueue { vni, queue }) => {
                if let Some(old) = st.by_vni.remove(&vni) {
                    remove_slot(poll, st, old);
                }
                let idx = st
                    .taps
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or(st.taps.len());
                let token = Token(FIRST_TAP + idx);
                if let Err(e) = poll.registry().register(
                    &mut SourceFd(&queue.as_raw_fd()),
                    token,
                    Interest::READABLE,
                ) {
                    tracing::error!(%vni, error = %e, "registering TAP queue; network not served by this worker");
                    continue;
                }
                if idx == st.taps.len() {
                    st.taps.push(None);
                }
                st.taps[idx] = Some(TapSlot { vni, queue });
                st.by_vni.insert(vni, idx);
            }
            Ok(Control::Remove { vni, done }) => {
                if let Some(idx) = st.by_vni.remove(&vni) {
                    remove_slot(poll, st, idx);
                }
                st.learned.forget(vni);
                let _ = done.send(());
            }
            Ok(Control::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return false,
            Err(mpsc::TryRecvError::Empty) => return true,
        }
    }
}

fn remove_slot(poll: &Poll, st: &mut State, idx: usize) {
    if let Some(slot) = st.taps[idx].take() {
        let _ = poll
            .registry()
            .deregister(&mut SourceFd(&slot.queue.as_raw_fd()));
    }
}

struct Io<'a> {
    udp: &'a UdpSocket,
    pool: &'a SendPool,
    tables: &'a ArcSwap<Index>,
    counters: &'a Counters,
}

impl Io<'_> {
    /// Handles up to [`BUDGET`] frames from one TAP queue; true if it may have more.
    fn on_tap(&self, st: &mut State, idx: usize) -> bool {
        let State {
            taps,
            learned,
            buf,
            reply,
            ..
        } = st;
        let Some(Some(slot)) = taps.get(idx) else {
            return false;
        };
        let tables = self.tables.load();
        let net = tables.network(slot.vni);
        for _ in 0..BUDGET {
            let n = match slot.queue.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(vni = %slot.vni, error = %e, "reading TAP; queue dropped");
                    return false;
                }
            };
            self.counters.add(&self.counters.rx_frames, 1);
            let Some(vh) = vnet::Header::parse(&buf[..n]) else {
                self.counters.drop(DropReason::MalformedFrame);
                continue;
            };
            if vh.is_gso() || vh.needs_csum() {
                // Offloads are not enabled on this TAP; the kernel should never do this.
                self.counters.drop(DropReason::Offload);
                continue;
            }
            let Some(net) = net else {
                self.counters.drop(DropReason::UnknownNetwork);
                continue;
            };
            let frame = &buf[TAP_HEADROOM..n];
            let decision = switch::from_tap(frame, net, learned, Instant::now(), reply);
            match decision {
                Forward::Remote(vtep) => {
                    let hash = flowhash::hash(frame);
                    vxlan::Repr { vni: slot.vni }
                        .emit(&mut buf[TAP_HEADROOM - vxlan::HEADER_LEN..]);
                    self.send(hash, &buf[TAP_HEADROOM - vxlan::HEADER_LEN..n], vtep);
                }
                Forward::Flood => {
                    let hash = flowhash::hash(frame);
                    vxlan::Repr { vni: slot.vni }
                        .emit(&mut buf[TAP_HEADROOM - vxlan::HEADER_LEN..]);
                    self.counters.add(&self.counters.flooded, 1);
                    for &peer in net.peers() {
                        self.send(hash, &buf[TAP_HEADROOM - vxlan::HEADER_LEN..n], peer);
                    }
                }
                Forward::Reply(len) => match slot.queue.write_parts(&ZERO_VNET, &reply[..len]) {
                    Ok(_) => self.counters.add(&self.counters.arp_answered, 1),
                    Err(_) => self.counters.drop(DropReason::TapWrite),
                },
                Forward::Deliver(_) => self.counters.drop(DropReason::MalformedFrame),
                Forward::Drop(reason) => self.counters.drop(reason),
            }
        }
        true
    }

    fn send(&self, hash: u32, datagram: &[u8], to: SocketAddrV4) {
        match self.pool.pick(hash).send_to(datagram, to) {
            Ok(_) => self.counters.add(&self.counters.tx_vxlan, 1),
            Err(e) => {
                tracing::trace!(%to, error = %e, "VXLAN send failed");
                self.counters.drop(DropReason::UdpSend);
            }
        }
    }

    /// Handles up to [`BUDGET`] datagrams; true if there may be more.
    fn on_udp(&self, st: &mut State) -> bool {
        let State {
            taps,
            by_vni,
            learned,
            buf,
            ..
        } = st;
        let tables = self.tables.load();
        for _ in 0..BUDGET {
            let (n, from) = match self.udp.recv_from(&mut buf[UDP_OFFSET..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here on some kernels; they do not stop the socket.
                    tracing::trace!(error = %e, "VXLAN receive error");
                    continue;
                }
            };
            self.counters.add(&self.counters.rx_vxlan, 1);
            let SocketAddr::V4(from) = from else {
                self.counters.drop(DropReason::NotMember);
                continue;
            };
            let end = UDP_OFFSET + n;
            match switch::from_vtep(
                &buf[UDP_OFFSET..end],
                from,
                &tables,
                learned,
                Instant::now(),
            ) {
                Forward::Deliver(vni) => {
                    let Some(Some(slot)) = by_vni.get(&vni).and_then(|&i| taps.get(i)) else {
                        self.counters.drop(DropReason::NoTap);
                        continue;
                    };
                    // The vnet header takes the place of the VXLAN header: no copy.
                    buf[..vnet::HEADER_LEN].fill(0);
                    if slot.queue.write(&buf[..end]).is_err() {
                        self.counters.drop(DropReason::TapWrite);
                    }
                }
                Forward::Drop(reason) => self.counters.drop(reason),
                _ => self.counters.drop(DropReason::MalformedFrame),
            }
        }
        true
    }
}
