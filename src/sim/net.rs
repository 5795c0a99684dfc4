//! The simulator's underlay for gossip: datagrams between bound addresses in one process, each
//! lost with a seeded probability or delivered after a seeded latency, none longer than UDP
//! over IPv4 carries; and a wall clock that follows tokio's (paused) time.
//!
//! It carries the signed datagrams [`crate::gossip`] makes, so signing and checking run as in
//! the daemon, and counts them by chitchat message kind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::gossip::{self, DatagramSocket, Datagrams, WallClock};

/// The largest UDP payload IPv4 carries; a longer datagram is refused by the sender's kernel
/// (EMSGSIZE).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// How the network treats datagrams.
#[derive(Clone, Copy, Debug)]
pub struct Conditions {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Each datagram takes a latency drawn uniformly from this range.
    pub latency: (Duration, Duration),
}

/// chitchat's message kinds, by the code after its magic and version (see its `message.rs`).
const KINDS: [&str; 4] = ["syn", "synack", "ack", "badcluster"];
/// Where the kind's code is in a signed datagram: the time, the magic (2) and the version (1).
const KIND_AT: usize = gossip::STAMP_LEN + 3;

/// What the network carried, per message kind (index in [`KINDS`]).
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    pub sent: [u64; 4],
    pub bytes: [u64; 4],
    pub largest: [usize; 4],
    /// Lost on the way (the loss rate), any kind.
    pub lost: u64,
    /// Refused by the sender for being longer than [`MAX_UDP_PAYLOAD`].
    pub too_long: u64,
}

impl Traffic {
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

type Inbox = mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>;

struct Inner {
    rng: StdRng,
    conditions: Conditions,
    bound: HashMap<SocketAddr, Inbox>,
    traffic: Traffic,
}

/// The network; clones share it.
#[derive(Clone)]
pub struct Net(Arc<Mutex<Inner>>);

impl Net {
    pub fn new(seed: u64, conditions: Conditions) -> Net {
        Net(Arc::new(Mutex::new(Inner {
            rng: StdRng::seed_from_u64(seed),
            conditions,
            bound: HashMap::new(),
            traffic: Traffic::default(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was carried since the last call.
    pub fn take_traffic(&self) -> Traffic {
        std::mem::take(&mut self.lock().traffic)
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        let mut inner = self.lock();
        let kind = datagram
            .get(KIND_AT)
            .map_or(KINDS.len() - 1, |k| usize::from(*k).min(KINDS.len() - 1));
        if datagram.len() > MAX_UDP_PAYLOAD {
            inner.traffic.too_long += 1;
            return Err(std::io::Error::other("message too long"));
        }
        let traffic = &mut inner.traffic;
        traffic.sent[kind] += 1;
        traffic.bytes[kind] += datagram.len() as u64;
        traffic.largest[kind] = traffic.largest[kind].max(datagram.len());
        let Conditions { loss, latency } = inner.conditions;
        if inner.rng.random_bool(loss) {
            inner.traffic.lost += 1;
            return Ok(());
        }
        let Some(inbox) = inner.bound.get(&to).cloned() else {
            return Ok(());
        };
        let micros = inner
            .rng
            .random_range(latency.0.as_micros() as u64..=latency.1.as_micros() as u64);
        let datagram = datagram.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(micros)).await;
            let _ = inbox.send((datagram, from));
        });
        Ok(())
    }
}

#[async_trait::async_trait]
impl Datagrams for Net {
    async fn bind(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn DatagramSocket>> {
        let (inbox, arrivals) = mpsc::unbounded_channel();
        if self.lock().bound.insert(addr, inbox).is_some() {
            anyhow::bail!("{addr} is bound already");
        }
        Ok(Box::new(Socket {
            addr,
            net: self.clone(),
            arrivals,
        }))
    }
}

struct Socket {
    addr: SocketAddr,
    net: Net,
    arrivals: mpsc::UnboundedReceiver<(Vec<u8>, SocketAddr)>,
}

#[async_trait::async_trait]
impl DatagramSocket for Socket {
    async fn send_to(&mut self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        self.net.send(self.addr, to, datagram)
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        // The inbox lives while this socket is bound: `None` cannot come.
        let Some((datagram, from)) = self.arrivals.recv().await else {
            return std::future::pending().await;
        };
        let len = datagram.len().min(buf.len());
        buf[..len].copy_from_slice(&datagram[..len]);
        Ok((len, from))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.net.lock().bound.remove(&self.addr);
    }
}

/// A wall clock that starts at `epoch_ms` and advances with tokio's time, plus a node's skew.
pub struct Clock {
    pub epoch_ms: u64,
    pub started: Instant,
    pub skew_ms: i64,
}

impl WallClock for Clock {
    fn unix_ms(&self) -> u64 {
        let elapsed = self.started.elapsed().as_millis() as u64;
        (self.epoch_ms + elapsed).saturating_add_signed(self.skew_ms)
    }
}
