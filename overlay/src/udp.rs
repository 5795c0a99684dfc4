//! The underlay UDP sockets: one receiving socket per worker on the local VTEP address
//! (`SO_REUSEPORT`, so the kernel spreads flows across workers), and a pool of sending
//! sockets bound to distinct ports spread over 49152-65535.
//!
//! A socket cannot choose its source port per datagram, so the outer source port of
//! RFC 7348 §5 is chosen by picking the pool socket that matches the inner flow hash.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::flowhash;

/// How many send sockets the pool tries to bind.
pub const POOL_SIZE: usize = 32;

const RECV_BUFFER: usize = 4 << 20;
const SEND_BUFFER: usize = 4 << 20;

/// Binds one non-blocking receiving socket on `addr` with `SO_REUSEPORT`; call once per worker.
pub fn bind_receiver(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Sending sockets bound to distinct source ports; shared by all workers (sending on a UDP
/// socket from several threads is safe and needs no lock).
#[derive(Debug)]
pub struct SendPool {
    sockets: Vec<UdpSocket>,
}

impl SendPool {
    /// Binds up to `size` sockets on `ip`, one per equal slice of 49152-65535, skipping ports
    /// that are in use. Fails only if not a single port could be bound.
    pub fn bind(ip: Ipv4Addr, size: usize) -> io::Result<SendPool> {
        let size = size.clamp(1, 1024);
        let span = usize::from(flowhash::PORT_MAX - flowhash::PORT_MIN) + 1;
        let slice = span / size;
        let mut sockets = Vec::with_capacity(size);
        let mut last_err = None;
        for i in 0..size {
            let base = usize::from(flowhash::PORT_MIN) + i * slice;
            for port in base..base + slice {
                match bind_sender(SocketAddrV4::new(ip, port as u16)) {
                    Ok(s) => {
                        sockets.push(s);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
                    Err(e) => return Err(e),
                }
            }
        }
        if sockets.is_empty() {
            return Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)));
        }
        Ok(SendPool { sockets })
    }

    /// The socket whose source port carries this flow hash.
    pub fn pick(&self, flow_hash: u32) -> &UdpSocket {
        &self.sockets[flow_hash as usize % self.sockets.len()]
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The bound source ports, in pool order.
    pub fn ports(&self) -> Vec<u16> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.port())
            .collect()
    }
}

/// Blocking on purpose: a full send buffer pushes back on the worker (and so on the TAP)
/// instead of dropping.
fn bind_sender(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_send_buffer_size(SEND_BUFFER);
    // We never expect datagrams here; keep the receive queue small.
    let _ = socket.set_recv_buffer_size(4096);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ports_are_distinct_and_in_range() {
        let pool = SendPool::bind(Ipv4Addr::LOCALHOST, 8).unwrap();
        let ports = pool.ports();
        assert_eq!(ports.len(), 8);
        let mut sorted = ports.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert!(
            ports
                .iter()
                .all(|p| (flowhash::PORT_MIN..=flowhash::PORT_MAX).contains(p))
        );
        // Same hash, same socket.
        assert_eq!(
            pool.pick(12345).local_addr().unwrap(),
            pool.pick(12345).local_addr().unwrap()
        );
    }

    #[test]
    fn receivers_share_a_port() {
        let a = bind_receiver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = a.local_addr().unwrap().port();
        let _b = bind_receiver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
