//! One data-path thread: polls its TAP queues and its VXLAN socket, runs the switch, and
//! does the I/O the switch asks for.
//!
//! Per packet there is no lock and no allocation: tables are read through an atomic pointer,
//! frames are read into a buffer with headroom so the VXLAN header is written in place in
//! front of the frame, decapsulated frames go to the TAP behind a vnet header in one
//! `writev`, and counters are relaxed atomics read by
//! [`DataPlane::stats`](crate::DataPlane::stats).
//!
//! Both directions gather: TAP to UDP, the segments of super-frames and runs of equal-size
//! frames fill whole `UDP_SEGMENT` sends ([`Batch`]); UDP to TAP, the TCP segments of one
//! flow (and UDP datagrams of one flow, for a TAP that accepted USO) are coalesced across
//! `UDP_GRO` reads into one TAP write. What is gathered leaves as
//! soon as the source has nothing more to read, so gathering never waits.

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

use crate::batch::Batch;
use crate::fdb::{Index, Learned, Network};
use crate::governor::Layout;
use crate::offload::{self, Coalescer, Push};
use crate::stage::{Checksum, Stage};
use crate::switch::{self, Delivery, DropReason, Forward};
use crate::traffic::{DROP_REASONS, NetCounters, Peers};
use crate::udp::{self, RecvBatch, SendPool};
use crate::vxlan::{self, Vni};
use crate::wire::Wire;
use crate::{flowhash, keyring, seal, steer, tap, vnet};

/// Messages from the control side; each is followed by a wake-up.
pub(crate) enum Control {
    /// Serve this queue of the network's TAP; `uso` if the TAP accepted USO (`TUN_F_USO4` and
    /// `TUN_F_USO6`), so UDP datagrams of one flow may be coalesced into one TAP write.
    AddQueue {
        vni: Vni,
        queue: tap::Queue,
        uso: bool,
        traffic: Arc<NetCounters>,
    },
    /// Close the network's queue and forget what was learned on it, then acknowledge.
    Remove { vni: Vni, done: mpsc::Sender<()> },
    /// Pin or unpin this worker and, on worker 0, attach or detach the steering programs
    /// (see `governor`). Sent only to workers that have a `cpu`.
    Layout(Layout),
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
    pub gso_frames: AtomicU64,
    pub gro_frames: AtomicU64,
    pub drops: [AtomicU64; DROP_REASONS],
}

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
/// Datagrams or `UDP_GRO` batches received per call: small packets of different flows,
/// which GRO cannot merge, share one `recvmmsg`. Eight 64 KB buffers per worker, touched only
/// as far as traffic fills them.
const RECV_BATCH: usize = 8;
/// Headroom before a TAP frame: the vnet header, which the VXLAN header then overwrites.
const TAP_HEADROOM: usize = vnet::HEADER_LEN;

const ZERO_VNET: [u8; vnet::HEADER_LEN] = [0; vnet::HEADER_LEN];

/// Where a decapsulated frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    /// The TAP in this slot.
    Tap(usize),
    /// Out of the node's own interfaces ([`crate::wire`]).
    Wire,
}

struct TapSlot {
    vni: Vni,
    queue: tap::Queue,
    /// The TAP takes UDP_L4 (USO) super-frames.
    uso: bool,
    /// This worker's counters of the network.
    traffic: Arc<NetCounters>,
}

pub(crate) struct Worker {
    pub poll: Poll,
    pub control: mpsc::Receiver<Control>,
    pub udp: UdpSocket,
    pub pool: Arc<SendPool>,
    pub tables: Arc<ArcSwap<Index>>,
    pub peers: Arc<ArcSwap<Peers>>,
    pub counters: Arc<Counters>,
    /// Offload path: receive with `UDP_GRO` and coalesce TCP before writing to the TAP.
    pub offloads: bool,
    pub stage: Arc<dyn Stage>,
    /// Where replies to the node's own stack leave ([`crate::wire`]); none if it could not be
    /// opened.
    pub wire: Option<Arc<Wire>>,
    /// `(i, n)`: this is worker `i` of `n`, one per CPU, so it can be steered (see
    /// `governor`); `None` if workers and CPUs do not match.
    pub cpu: Option<(usize, usize)>,
    /// On the one worker (0) that attaches the steering programs, which are per device and
    /// per socket group: the TAP program.
    pub steering: Option<steer::TapProgram>,
}

struct State {
    taps: Vec<Option<TapSlot>>,
    by_vni: HashMap<Vni, usize>,
    learned: Learned,
    /// TAP frames are read into this.
    buf: Box<[u8]>,
    /// A frame of an encrypted network is sealed into this, once per peer.
    sealed: Box<[u8]>,
    /// VXLAN datagrams (or `UDP_GRO` batches) are received into this, several per call.
    rx: RecvBatch,
    reply: Box<[u8]>,
    coalescer: Coalescer,
    batch: Batch,
    /// `UDP_SEGMENT` works; cleared when the kernel refuses it.
    gso: bool,
    /// The layout last applied; new TAPs get worker 0's steering program while steered.
    layout: Layout,
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
            peers,
            counters,
            offloads,
            stage,
            wire,
            cpu,
            steering,
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
            sealed: vec![0u8; BUF_LEN + seal::HEADER_LEN + seal::TAG_LEN].into_boxed_slice(),
            rx: RecvBatch::new(RECV_BATCH, BUF_LEN),
            reply: vec![0u8; switch::REPLY_LEN].into_boxed_slice(),
            coalescer: Coalescer::new(),
            batch: Batch::new(offloads),
            gso: offloads,
            layout: Layout::Spread,
        };
        let io = Io {
            udp: &udp,
            pool: &pool,
            tables: &tables,
            peers: &peers,
            counters: &counters,
            offloads,
            stage: &*stage,
            wire: wire.as_deref(),
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
                    let steer = Steer {
                        cpu,
                        program: steering.as_ref(),
                    };
                    if !handle_control(&poll, &control, &udp, steer, &mut st) {
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

/// What a worker may do about where it runs: its `Worker::cpu` and `Worker::steering`.
#[derive(Clone, Copy)]
struct Steer<'a> {
    cpu: Option<(usize, usize)>,
    program: Option<&'a steer::TapProgram>,
}

/// Applies queued control messages. Returns false on shutdown.
fn handle_control(
    poll: &Poll,
    control: &mpsc::Receiver<Control>,
    udp: &UdpSocket,
    steering: Steer<'_>,
    st: &mut State,
) -> bool {
    loop {
        match control.try_recv() {
            Ok(Control::AddQueue {
                vni,
                queue,
                uso,
                traffic,
            }) => {
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
                if let Some(program) = steering.program
                    && st.layout == Layout::Steered
                    && let Err(e) = steer::attach_tap(&queue, program)
                {
                    tracing::warn!(%vni, error = %e, "kernel refused the TAP steering program; its flows are hashed to workers");
                }
                st.taps[idx] = Some(TapSlot {
                    vni,
                    queue,
                    uso,
                    traffic,
                });
                st.by_vni.insert(vni, idx);
            }
            Ok(Control::Layout(layout)) => {
                if let Some(cpu) = steering.cpu {
                    apply_layout(layout, cpu, steering.program, udp, st);
                }
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

/// Pins or unpins this worker; the worker holding `program` also attaches or detaches the
/// programs that steer packets by CPU, for the socket group and every TAP (each is per group
/// or per device). A refusal is logged and leaves that part hashed, which is slower to wake
/// but correct.
fn apply_layout(
    layout: Layout,
    (index, cpus): (usize, usize),
    program: Option<&steer::TapProgram>,
    udp: &UdpSocket,
    st: &mut State,
) {
    st.layout = layout;
    let steered = layout == Layout::Steered;
    let pinned = if steered {
        steer::pin_current_thread(index)
    } else {
        steer::unpin_current_thread(cpus)
    };
    if let Err(e) = pinned {
        tracing::warn!(worker = index, ?layout, error = %e, "cannot change the worker's CPU affinity");
    }
    let Some(program) = program else {
        return;
    };
    let group = if steered {
        steer::attach_reuseport(udp, cpus as u32)
    } else {
        steer::detach_reuseport(udp)
    };
    if let Err(e) = group {
        tracing::warn!(?layout, error = %e, "cannot change the VXLAN socket steering program");
    }
    for slot in st.taps.iter().flatten() {
        let tap = if steered {
            steer::attach_tap(&slot.queue, program)
        } else {
            steer::detach_tap(&slot.queue)
        };
        if let Err(e) = tap {
            tracing::warn!(vni = %slot.vni, ?layout, error = %e, "cannot change the TAP steering program");
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
    peers: &'a ArcSwap<Peers>,
    counters: &'a Counters,
    offloads: bool,
    stage: &'a dyn Stage,
    wire: Option<&'a Wire>,
}

impl Io<'_> {
    /// Counts a drop of a frame of the network counted by `net`.
    fn drop_in(&self, net: &NetCounters, reason: DropReason) {
        self.counters.drop(reason);
        net.dropped(reason);
    }

    /// Handles up to [`BUDGET`] frames from one TAP queue; true if it may have more.
    fn on_tap(&self, st: &mut State, idx: usize) -> bool {
        let more = self.on_tap_frames(st, idx);
        // The queue is drained or the budget spent: what was gathered goes out now.
        self.send_batch(&mut st.batch, &mut st.gso, true);
        more
    }

    fn on_tap_frames(&self, st: &mut State, idx: usize) -> bool {
        let State {
            taps,
            learned,
            buf,
            sealed,
            reply,
            gso,
            batch,
            ..
        } = st;
        let Some(Some(slot)) = taps.get(idx) else {
            return false;
        };
        let tables = self.tables.load();
        let net = tables.network(slot.vni);
        // One clock read per batch: it only ages learned MACs (minutes).
        let now = Instant::now();
        for _ in 0..BUDGET {
            let n = match slot.queue.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(vni = %slot.vni, error = %e, "reading TAP failed");
                    return false;
                }
            };
            self.counters.add(&self.counters.rx_frames, 1);
            slot.traffic.read_frame(n.saturating_sub(TAP_HEADROOM));
            let Some(vh) = vnet::Header::parse(&buf[..n]) else {
                self.drop_in(&slot.traffic, DropReason::MalformedFrame);
                continue;
            };
            let Some(net) = net else {
                self.drop_in(&slot.traffic, DropReason::UnknownNetwork);
                continue;
            };
            // A super-frame keeps its partial checksum (it is segmented, or written back, with
            // its vnet header); a plain frame's is completed here, once.
            let checksum = if vh.is_gso() {
                Checksum::Partial
            } else if vh.needs_csum()
                && offload::complete_checksum(
                    &mut buf[TAP_HEADROOM..n],
                    usize::from(vh.csum_start),
                    usize::from(vh.csum_offset),
                )
                .is_err()
            {
                self.drop_in(&slot.traffic, DropReason::Offload);
                continue;
            } else {
                Checksum::Full
            };
            let forward = switch::from_tap(
                &mut buf[TAP_HEADROOM..n],
                net,
                learned,
                now,
                reply,
                self.stage,
                checksum,
            );
            if vh.is_gso() {
                let frame = &buf[TAP_HEADROOM..n];
                let remote;
                let targets = match forward {
                    Forward::Remote(vtep) => {
                        remote = [vtep];
                        &remote[..]
                    }
                    Forward::Flood => {
                        self.counters.add(&self.counters.flooded, 1);
                        net.peers()
                    }
                    // The super-frame goes back whole, with the vnet header it came with.
                    Forward::Local => {
                        self.write_tap(taps, idx, &[], &buf[..n]);
                        continue;
                    }
                    Forward::Drop(reason) => {
                        self.drop_in(&slot.traffic, reason);
                        continue;
                    }
                    // The stage's answer to a super-frame (a reset): a plain frame.
                    Forward::Reply(len) => {
                        self.write_tap(taps, idx, &ZERO_VNET, &reply[..len]);
                        continue;
                    }
                    // Out whole, with its vnet header: the interface segments it.
                    Forward::Wire => {
                        let mut header = ZERO_VNET;
                        header.copy_from_slice(&buf[..TAP_HEADROOM]);
                        self.to_wire(&header, &mut buf[TAP_HEADROOM..n]);
                        continue;
                    }
                    Forward::WireReply(len) => {
                        self.to_wire(&ZERO_VNET, &mut reply[..len]);
                        continue;
                    }
                };
                self.send_super(net, frame, &vh, targets, batch, gso);
                continue;
            }
            let frame = &buf[TAP_HEADROOM..n];
            match forward {
                // Each peer has its own key: the frame is sealed into a copy per peer.
                Forward::Remote(vtep) if net.sealed() => {
                    self.send_sealed(net, frame, &[vtep], sealed, batch, gso);
                }
                Forward::Flood if net.sealed() => {
                    self.counters.add(&self.counters.flooded, 1);
                    self.send_sealed(net, frame, net.peers(), sealed, batch, gso);
                }
                Forward::Remote(vtep) => {
                    let hash = flowhash::hash(frame);
                    vxlan::Repr { vni: slot.vni }
                        .emit(&mut buf[TAP_HEADROOM - vxlan::HEADER_LEN..]);
                    let datagram = &buf[TAP_HEADROOM - vxlan::HEADER_LEN..n];
                    self.push(hash, datagram, vtep, batch, gso);
                }
                Forward::Flood => {
                    let hash = flowhash::hash(frame);
                    vxlan::Repr { vni: slot.vni }
                        .emit(&mut buf[TAP_HEADROOM - vxlan::HEADER_LEN..]);
                    self.counters.add(&self.counters.flooded, 1);
                    self.send_batch(batch, gso, true);
                    for &peer in net.peers() {
                        self.send(hash, &buf[TAP_HEADROOM - vxlan::HEADER_LEN..n], peer);
                    }
                }
                // Checksums are complete now: no vnet flags.
                Forward::Local => self.write_tap(taps, idx, &ZERO_VNET, frame),
                Forward::Reply(len) => match slot.queue.write_parts(&ZERO_VNET, &reply[..len]) {
                    Ok(_) => self.counters.add(&self.counters.arp_answered, 1),
                    Err(_) => self.drop_in(&slot.traffic, DropReason::TapWrite),
                },
                // Checksums are complete now: no vnet flags.
                Forward::Wire => self.to_wire(&ZERO_VNET, &mut buf[TAP_HEADROOM..n]),
                Forward::WireReply(len) => self.to_wire(&ZERO_VNET, &mut reply[..len]),
                Forward::Drop(reason) => self.drop_in(&slot.traffic, reason),
            }
        }
        true
    }

    /// Adds one datagram to the batch (sending what it holds first if it cannot join), or sends
    /// it alone if it cannot be batched.
    fn push(
        &self,
        hash: u32,
        datagram: &[u8],
        to: SocketAddrV4,
        batch: &mut Batch,
        gso: &mut bool,
    ) {
        if datagram.len() <= batch.buf.len() {
            let socket = self.pool.index(hash);
            if !batch.accepts(socket, to, datagram.len()) {
                self.send_batch(batch, gso, true);
            }
            batch.push(socket, hash, to, datagram);
            self.send_batch(batch, gso, false);
        } else {
            // Offloads off (no batch buffer), or a frame too big to batch.
            self.send_batch(batch, gso, true);
            self.send(hash, datagram, to);
        }
    }

    /// Seals a copy of `frame` for each of `targets` in `scratch` and sends it; a target
    /// without a key gets nothing (never the frame in the clear).
    fn send_sealed(
        &self,
        net: &Network,
        frame: &[u8],
        targets: &[SocketAddrV4],
        scratch: &mut [u8],
        batch: &mut Batch,
        gso: &mut bool,
    ) {
        let hash = flowhash::hash(frame);
        for &to in targets {
            let sealed = net
                .keys(*to.ip())
                .and_then(|peer| keyring::seal_copy(peer, net.vni(), frame, scratch));
            match sealed {
                Some(len) => self.push(hash, &scratch[..len], to, batch, gso),
                None => self.counters.drop(DropReason::NoKey),
            }
        }
    }

    /// Sends a frame out of the node's own interfaces (see [`crate::wire`]).
    fn to_wire(&self, header: &[u8; vnet::HEADER_LEN], frame: &mut [u8]) {
        let sent = self
            .wire
            .is_some_and(|wire| wire.send(header, frame).is_ok());
        if !sent {
            self.counters.drop(DropReason::WireSend);
        }
    }

    /// Segments a TSO/USO super-frame into the batch (joining what it holds if that goes the
    /// same way) and sends the full `UDP_SEGMENT` groups; a flood goes to every target at once.
    ///
    /// On an encrypted network each segment is sealed for its target right after it is built,
    /// in place, and a flood is segmented once per target (each has its own key).
    fn send_super(
        &self,
        net: &Network,
        frame: &[u8],
        vh: &vnet::Header,
        targets: &[SocketAddrV4],
        batch: &mut Batch,
        gso: &mut bool,
    ) {
        let vni = net.vni();
        let peer = match targets {
            [to] if net.sealed() => match net.keys(*to.ip()) {
                Some(peer) => Some(peer),
                None => {
                    self.counters.drop(DropReason::NoKey);
                    return;
                }
            },
            _ if net.sealed() => {
                for to in targets {
                    self.send_super(net, frame, vh, std::slice::from_ref(to), batch, gso);
                }
                return;
            }
            _ => None,
        };
        let hash = flowhash::hash(frame);
        let socket = self.pool.index(hash);
        let to = match targets {
            [to] => Some(*to),
            _ => None,
        };
        if !to.is_some_and(|to| batch.accepts(socket, to, 0)) {
            self.send_batch(batch, gso, true);
        }
        let at = batch.len;
        let out = &mut batch.buf[at..];
        let segmented = match peer {
            Some(peer) => offload::segment_with(
                frame,
                vh,
                (seal::HEADER_LEN, seal::TAG_LEN),
                out,
                |datagram| peer.send.seal(vni, datagram),
            ),
            None => offload::segment_with(frame, vh, (vxlan::HEADER_LEN, 0), out, |datagram| {
                vxlan::Repr { vni }.emit(datagram)
            }),
        };
        let segs = match segmented {
            Ok(s) => s,
            Err(e) => {
                tracing::trace!(error = %e, "cannot segment super-frame");
                self.counters.drop(DropReason::Offload);
                return;
            }
        };
        self.counters.add(&self.counters.gso_frames, 1);
        if batch.count > 0 && segs.stride != batch.stride {
            // Another MSS through the same socket (rare): send what was there first (all of
            // it: the batch ends at `at`), then move the new segments to the front.
            self.send_batch(batch, gso, true);
            batch.buf.copy_within(at..at + segs.len(), 0);
        }
        let Some(to) = to else {
            for &to in targets {
                self.send_segments(hash, &batch.buf[..segs.len()], segs, to, gso);
            }
            return;
        };
        if batch.count == 0 {
            batch.start(socket, hash, to, segs.stride);
        }
        batch.appended(segs.count, segs.len());
        self.send_batch(batch, gso, false);
    }

    /// Sends the batch's full `UDP_SEGMENT` groups, or with `all` everything it holds.
    fn send_batch(&self, batch: &mut Batch, gso: &mut bool, all: bool) {
        if let Some(segs) = batch.ready(all) {
            self.send_segments(batch.hash, &batch.buf[..segs.len()], segs, batch.to, gso);
            batch.consume(segs);
        }
    }

    /// Sends datagrams laid out at `segs.stride`, as few `UDP_SEGMENT` sends as the kernel
    /// allows, falling back to one send per datagram.
    fn send_segments(
        &self,
        hash: u32,
        data: &[u8],
        segs: offload::Segments,
        to: SocketAddrV4,
        gso: &mut bool,
    ) {
        let socket = self.pool.pick(hash);
        let per_send = udp::datagrams_per_send(segs.stride);
        let mut i = 0;
        while i < segs.count {
            let k = per_send.min(segs.count - i);
            let start = i * segs.stride;
            let end = if i + k == segs.count {
                segs.len()
            } else {
                (i + k) * segs.stride
            };
            if k > 1 && *gso {
                match udp::send_gso(socket, &data[start..end], to, segs.stride as u16) {
                    Ok(_) => {
                        self.counters.add(&self.counters.tx_vxlan, k as u64);
                        i += k;
                        continue;
                    }
                    Err(e) => {
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
                        ) {
                            tracing::warn!(error = %e, "UDP_SEGMENT refused; sending datagrams one by one");
                            *gso = false;
                        }
                    }
                }
            }
            for j in 0..k {
                let s = start + j * segs.stride;
                self.send(hash, &data[s..(s + segs.stride).min(end)], to);
            }
            i += k;
        }
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

    /// Handles up to [`BUDGET`] reads from the VXLAN socket; true if there may be more.
    ///
    /// One read is one datagram, or with `UDP_GRO` a batch of equal-size datagrams. Each
    /// datagram is checked and decapsulated; with offloads, consecutive TCP segments of one
    /// flow (and, if the TAP accepted USO, equal-size UDP datagrams of one flow) are coalesced
    /// into one TAP write, also across reads (a sender's super-frame often arrives as two GSO
    /// batches), and the coalesced frame is written once the socket is drained or the budget
    /// spent, so coalescing adds no wait.
    fn on_udp(&self, st: &mut State) -> bool {
        let State {
            taps,
            by_vni,
            learned,
            rx,
            reply,
            coalescer,
            ..
        } = st;
        let tables = self.tables.load();
        let peers = self.peers.load();
        // Where the frame the coalescer is filling goes.
        let mut current: Option<Sink> = None;
        let mut more = true;
        let mut handled = 0;
        while handled < BUDGET {
            let count = match rx.recv(self.udp) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here on some kernels; they do not stop the socket.
                    tracing::trace!(error = %e, "VXLAN receive error");
                    handled += 1;
                    continue;
                }
            };
            handled += count;
            let now = Instant::now();
            for m in 0..count {
                let (data, from, seg) = rx.get_mut(m);
                let seg = seg.unwrap_or(data.len()).max(1);
                self.counters
                    .add(&self.counters.rx_vxlan, data.len().div_ceil(seg) as u64);
                let SocketAddr::V4(from) = from else {
                    self.counters.drop(DropReason::NotMember);
                    continue;
                };
                let mut taken = 0;
                for datagram in data.chunks_mut(seg) {
                    // A sealed datagram is opened here, in place, before it is coalesced.
                    let (sink, at) = match switch::from_vtep(
                        datagram, from, &tables, learned, now, self.stage, reply,
                    ) {
                        Ok((Delivery::Tap(vni), at)) => match by_vni.get(&vni) {
                            Some(&idx) => (Sink::Tap(idx), at),
                            None => {
                                self.counters.drop(DropReason::NoTap);
                                continue;
                            }
                        },
                        Ok((Delivery::Wire, at)) => (Sink::Wire, at),
                        Err(reason) => {
                            self.counters.drop(reason);
                            continue;
                        }
                    };
                    taken += 1;
                    let inner = &mut datagram[at];
                    self.deliver(taps, sink, inner, coalescer, &mut current);
                }
                if taken > 0 {
                    peers.took(*from.ip(), taken, now);
                }
            }
            if count < RECV_BATCH {
                // recvmmsg stops short only when the queue ran dry or an error is pending (an
                // ICMP error, which wakes the socket and so raises an edge of its own); a
                // datagram arriving after that raises a new edge too. Asking again would only
                // return EAGAIN, one syscall more on every hop of a request/response.
                more = false;
                break;
            }
        }
        self.flush(taps, current, coalescer);
        more
    }

    /// Hands a decapsulated frame to `sink`: written at once on the plain path, else joined
    /// to what the coalescer holds for `current` (flushing that first if it cannot join), or
    /// written alone if it can never be coalesced.
    fn deliver(
        &self,
        taps: &[Option<TapSlot>],
        sink: Sink,
        inner: &mut [u8],
        coalescer: &mut Coalescer,
        current: &mut Option<Sink>,
    ) {
        if !self.offloads {
            self.write_to(taps, sink, &ZERO_VNET, inner);
            return;
        }
        if *current != Some(sink) {
            self.flush(taps, *current, coalescer);
            *current = Some(sink);
        }
        // UDP super-frames only to a TAP that takes them.
        let uso = match sink {
            Sink::Tap(idx) => taps[idx].as_ref().is_some_and(|s| s.uso),
            Sink::Wire => false,
        };
        let mut push = coalescer.push_with(inner, uso);
        if push == Push::Later {
            self.flush(taps, *current, coalescer);
            push = coalescer.push_with(inner, uso);
        }
        if push == Push::Never {
            self.flush(taps, *current, coalescer);
            self.write_to(taps, sink, &ZERO_VNET, inner);
        }
    }

    fn write_to(
        &self,
        taps: &[Option<TapSlot>],
        sink: Sink,
        header: &[u8; vnet::HEADER_LEN],
        frame: &mut [u8],
    ) {
        match sink {
            Sink::Tap(idx) => self.write_tap(taps, idx, header, frame),
            Sink::Wire => self.to_wire(header, frame),
        }
    }

    fn flush(&self, taps: &[Option<TapSlot>], sink: Option<Sink>, coalescer: &mut Coalescer) {
        let merged = coalescer.segments() > 1;
        let Some(out) = coalescer.finish() else {
            return;
        };
        if merged {
            self.counters.add(&self.counters.gro_frames, 1);
        }
        match sink {
            // Header and frame are contiguous: one plain write.
            Some(Sink::Tap(idx)) => self.write_tap(taps, idx, &[], out),
            Some(Sink::Wire) => {
                let (header, frame) = out.split_at_mut(TAP_HEADROOM);
                let mut vnet = ZERO_VNET;
                vnet.copy_from_slice(header);
                self.to_wire(&vnet, frame);
            }
            None => {}
        }
    }

    fn write_tap(&self, taps: &[Option<TapSlot>], idx: usize, header: &[u8], frame: &[u8]) {
        let Some(Some(slot)) = taps.get(idx) else {
            self.counters.drop(DropReason::NoTap);
            return;
        };
        let (written, len) = if header.is_empty() {
            // The frame starts with its vnet header.
            (
                slot.queue.write(frame),
                frame.len().saturating_sub(TAP_HEADROOM),
            )
        } else {
            (slot.queue.write_parts(header, frame), frame.len())
        };
        match written {
            Ok(_) => slot.traffic.wrote_frame(len),
            Err(_) => self.drop_in(&slot.traffic, DropReason::TapWrite),
        }
    }
}
