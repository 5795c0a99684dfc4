//! The underlay UDP sockets: one receiving socket per worker on the local VTEP address
//! (`SO_REUSEPORT`, so the kernel spreads flows across workers), and a pool of sending
//! sockets bound to distinct ports spread over 49152-65535.
//!
//! A socket cannot choose its source port per datagram, so the outer source port of
//! RFC 7348 §5 is chosen by picking the pool socket that matches the inner flow hash.
//!
//! For the offload path, [`send_gso`] sends equal-size datagrams laid out back to back in one
//! `sendmsg` with `UDP_SEGMENT`, and [`recv_gro`] receives a `UDP_GRO` batch and its segment
//! size. Those two and [`enable_gro`] need `sendmsg`/`recvmsg`/`setsockopt` with control
//! messages, which std and socket2 do not offer for these options: they are the `unsafe` in
//! the small `sys` module below.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// How many send sockets the pool tries to bind.
pub const POOL_SIZE: usize = 32;
/// Lowest outer source port (the dynamic range of RFC 6335, as RFC 7348 §5 recommends).
pub const PORT_MIN: u16 = 49152;
/// Highest outer source port.
pub const PORT_MAX: u16 = 65535;

const RECV_BUFFER: usize = 4 << 20;
const SEND_BUFFER: usize = 4 << 20;

/// Binds one non-blocking receiving socket on `addr` with `SO_REUSEPORT`; call once per worker.
pub fn bind_receiver(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Best effort: beyond net.core.rmem_max only with CAP_NET_ADMIN.
    if sys::force_buffer(&socket, libc::SO_RCVBUFFORCE, RECV_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    }
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
        let span = usize::from(PORT_MAX - PORT_MIN) + 1;
        let slice = span / size;
        let mut sockets = Vec::with_capacity(size);
        let mut last_err = None;
        for i in 0..size {
            let base = usize::from(PORT_MIN) + i * slice;
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
        &self.sockets[self.index(flow_hash)]
    }

    /// The index of the socket [`pick`](Self::pick) returns.
    pub fn index(&self, flow_hash: u32) -> usize {
        flow_hash as usize % self.sockets.len()
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
    if sys::force_buffer(&socket, libc::SO_SNDBUFFORCE, SEND_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SEND_BUFFER);
    }
    // We never expect datagrams here; keep the receive queue small.
    let _ = socket.set_recv_buffer_size(4096);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The most datagrams one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS`
/// is 64 on older kernels).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// The most bytes one `UDP_SEGMENT` send may carry (an IPv4 UDP payload).
pub const GSO_MAX_BYTES: usize = 65_507;

/// How many datagrams of `len` bytes one `UDP_SEGMENT` send carries (at least 1).
pub fn datagrams_per_send(len: usize) -> usize {
    (GSO_MAX_BYTES / len.max(1)).clamp(1, GSO_MAX_SEGMENTS)
}

/// How many inner frames of a network with `mtu` fit in one `UDP_SEGMENT` send (44 at MTU
/// 1450). A container whose TSO super-frames hold no more segments than this (its interface's
/// `gso_max_segs`) costs exactly one send and one TAP write per super-frame, not two.
pub fn segments_per_send(mtu: u32) -> u32 {
    let datagram = mtu as usize + crate::vxlan::HEADER_LEN + crate::ethernet::HEADER_LEN;
    datagrams_per_send(datagram) as u32
}

pub use sys::{RecvBatch, enable_gro, send_gso};
pub(crate) use sys::{set_int, set_option};

#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
    use std::os::fd::AsRawFd;

    fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }

    /// `setsockopt` of one `int` option; on error nothing changes.
    pub(crate) fn set_int(
        socket: &impl AsRawFd,
        level: libc::c_int,
        option: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: an int option, and a c_int holds no pointer.
        unsafe { set_option(socket, level, option, &value) }
    }

    /// `setsockopt` of `value`; on error nothing changes.
    ///
    /// # Safety
    /// `T` must be the type `option` takes, and any pointer inside `value` valid for the call.
    pub(crate) unsafe fn set_option<T>(
        socket: &impl AsRawFd,
        level: libc::c_int,
        option: libc::c_int,
        value: &T,
    ) -> io::Result<()> {
        // SAFETY: the pointer and length describe `value`, live for the duration of the call;
        // the caller vouches for what it points to.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                value as *const T as *const libc::c_void,
                size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sets a socket buffer size past `rmem_max`/`wmem_max` (`SO_RCVBUFFORCE` or
    /// `SO_SNDBUFFORCE`); needs CAP_NET_ADMIN, else fails and nothing changes.
    pub fn force_buffer(socket: &impl AsRawFd, option: libc::c_int, size: usize) -> io::Result<()> {
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        set_int(socket, libc::SOL_SOCKET, option, size)
    }

    /// Asks the kernel to coalesce received datagrams of one flow (`UDP_GRO`).
    pub fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
        set_int(socket, libc::SOL_UDP, libc::UDP_GRO, 1)
    }

    /// Sends `buf` to `to` as datagrams of `segment` bytes (the last may be shorter) in one
    /// `sendmsg` with `UDP_SEGMENT`. Returns the bytes sent.
    pub fn send_gso(
        socket: &UdpSocket,
        buf: &[u8],
        to: SocketAddrV4,
        segment: u16,
    ) -> io::Result<usize> {
        let mut addr = sockaddr(to);
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // u64 storage keeps the control buffer aligned for cmsghdr.
        let mut control = [0u64; 4];
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = &mut addr as *mut libc::sockaddr_in as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
        // SAFETY: msg_control points at `control` (32 bytes, aligned), which is larger than
        // CMSG_SPACE(2) = 24, so the first header and its u16 payload fit inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment);
        }
        // SAFETY: every pointer in `msg` refers to a local that outlives the call; the kernel
        // only reads through them.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Buffers for receiving several datagrams (or `UDP_GRO` batches) in one `recvmmsg`, so
    /// that small packets of different flows, which GRO cannot merge, cost one system call
    /// together instead of one each.
    ///
    /// All storage is allocated once; the message headers point into it. The struct may move
    /// (the pointers are to heap allocations it owns), but it is not `Send`: the pointers make
    /// it one thread's, which is how workers use it.
    pub struct RecvBatch {
        data: Box<[u8]>,
        len: usize,
        names: Box<[libc::sockaddr_storage]>,
        /// Control-message space and iovecs: only the headers' pointers read them.
        _controls: Box<[[u64; 8]]>,
        _iovs: Box<[libc::iovec]>,
        hdrs: Box<[libc::mmsghdr]>,
        /// What the last [`recv`](Self::recv) got, per message: length, sender, GRO segment.
        got: Vec<(usize, SocketAddr, Option<usize>)>,
    }

    impl RecvBatch {
        /// Room for `count` messages of up to `len` bytes each.
        pub fn new(count: usize, len: usize) -> RecvBatch {
            let count = count.max(1);
            let mut data = vec![0u8; count * len].into_boxed_slice();
            // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr are valid (empty) values.
            let mut names: Box<[libc::sockaddr_storage]> =
                (0..count).map(|_| unsafe { zeroed() }).collect();
            let mut controls: Box<[[u64; 8]]> = vec![[0u64; 8]; count].into_boxed_slice();
            let mut iovs: Box<[libc::iovec]> = (0..count)
                .map(|i| libc::iovec {
                    // SAFETY: i * len is within `data` (count * len bytes).
                    iov_base: unsafe { data.as_mut_ptr().add(i * len) } as *mut libc::c_void,
                    iov_len: len,
                })
                .collect();
            // SAFETY: as above.
            let mut hdrs: Box<[libc::mmsghdr]> = (0..count).map(|_| unsafe { zeroed() }).collect();
            for (i, h) in hdrs.iter_mut().enumerate() {
                h.msg_hdr.msg_name =
                    &mut names[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = controls[i].as_mut_ptr() as *mut libc::c_void;
            }
            RecvBatch {
                data,
                len,
                names,
                _controls: controls,
                _iovs: iovs,
                hdrs,
                got: Vec::with_capacity(count),
            }
        }

        /// Receives what is queued, up to the `count` messages given to [`new`](Self::new),
        /// without blocking; returns how many (`WouldBlock` if none).
        pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
            // The kernel rewrites these per message; give each its full room back.
            for h in self.hdrs.iter_mut() {
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_controllen = size_of::<[u64; 8]>() as _;
                h.msg_len = 0;
            }
            // SAFETY: every header points into storage this struct owns (names, one iovec of
            // `len` bytes into `data`, controls) with the sizes set above; the kernel writes
            // within them only. No timeout is passed.
            let n = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            self.got.clear();
            for i in 0..n as usize {
                let h = &self.hdrs[i];
                let segment = gro_segment(&h.msg_hdr);
                let from = sender(&self.names[i]);
                self.got.push((h.msg_len as usize, from, segment));
            }
            Ok(n as usize)
        }

        /// Message `i` of the last [`recv`](Self::recv): its bytes (writable, so a stage can
        /// rewrite them in place), its sender, and the segment size if it is a `UDP_GRO`
        /// batch.
        pub fn get_mut(&mut self, i: usize) -> (&mut [u8], SocketAddr, Option<usize>) {
            let (n, from, segment) = self.got[i];
            (
                &mut self.data[i * self.len..i * self.len + n.min(self.len)],
                from,
                segment,
            )
        }
    }

    /// The segment size from a received message's `UDP_GRO` control message (`None`: a
    /// single datagram).
    fn gro_segment(msg: &libc::msghdr) -> Option<usize> {
        let mut segment = None;
        // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
        // within them and every header they return is complete.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
                    segment = usize::try_from(size).ok().filter(|&s| s > 0);
                }
                cmsg = libc::CMSG_NXTHDR(msg, cmsg);
            }
        }
        segment
    }

    /// The sender the kernel wrote into `name` (IPv4; anything else maps to `[::]:0`, which
    /// no peer has).
    fn sender(name: &libc::sockaddr_storage) -> SocketAddr {
        if name.ss_family != libc::AF_INET as libc::sa_family_t {
            return SocketAddr::from(([0u16; 8], 0));
        }
        // SAFETY: the family says the storage holds a sockaddr_in, which it is large and
        // aligned enough for.
        let sin = unsafe { *(name as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_mtu_super_frame_fits_one_send() {
        assert_eq!(segments_per_send(1450), 44);
        assert_eq!(segments_per_send(9000 - 50), 7);
        assert_eq!(
            segments_per_send(576),
            64,
            "capped by the kernel's segment limit"
        );
    }

    #[test]
    fn pool_ports_are_distinct_and_in_range() {
        let pool = SendPool::bind(Ipv4Addr::LOCALHOST, 8).unwrap();
        let ports = pool.ports();
        assert_eq!(ports.len(), 8);
        let mut sorted = ports.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert!(ports.iter().all(|p| (PORT_MIN..=PORT_MAX).contains(p)));
        // Same hash, same socket.
        assert_eq!(
            pool.pick(12345).local_addr().unwrap(),
            pool.pick(12345).local_addr().unwrap()
        );
    }

    #[test]
    fn gso_send_and_gro_receive_on_loopback() {
        let rx = bind_receiver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let std::net::SocketAddr::V4(to) = rx.local_addr().unwrap() else {
            unreachable!()
        };
        enable_gro(&rx).unwrap();
        let pool = SendPool::bind(Ipv4Addr::LOCALHOST, 1).unwrap();
        let buf: Vec<u8> = (0..1000 * 5 + 300).map(|i| i as u8).collect();
        assert_eq!(send_gso(pool.pick(0), &buf, to, 1000).unwrap(), buf.len());
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        let mut batch = RecvBatch::new(4, 65536);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < buf.len() && std::time::Instant::now() < deadline {
            match batch.recv(&rx) {
                Ok(count) => {
                    for i in 0..count {
                        let (data, from, seg) = batch.get_mut(i);
                        assert_eq!(from.port(), pool.ports()[0]);
                        sizes.push((data.len(), seg));
                        got.extend_from_slice(data);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, buf, "segments {sizes:?}");
        // Every batch is whole segments of 1000 (GRO may or may not have merged them).
        for (n, seg) in sizes {
            assert!(seg.unwrap_or(n) == 1000 || n == 300, "{n} {seg:?}");
        }
    }

    /// Datagrams of three flows (three source ports: GRO cannot merge them) that are queued
    /// when the call is made all come back from one `recvmmsg`, each with its sender.
    #[test]
    fn one_call_receives_datagrams_of_different_flows() {
        let rx = bind_receiver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        enable_gro(&rx).unwrap();
        let to = rx.local_addr().unwrap();
        let senders: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        for (i, s) in senders.iter().enumerate() {
            // Loopback delivers inside send_to, so all three are queued afterwards.
            s.send_to(&[i as u8; 100], to).unwrap();
        }
        let mut batch = RecvBatch::new(8, 2048);
        assert_eq!(batch.recv(&rx).unwrap(), 3, "one call, three flows");
        for (i, s) in senders.iter().enumerate() {
            let (data, from, seg) = batch.get_mut(i);
            assert_eq!(data, &[i as u8; 100][..]);
            assert_eq!(from, s.local_addr().unwrap());
            assert_eq!(seg, None, "a single datagram, not a GRO batch");
        }
        assert_eq!(
            batch.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn receivers_share_a_port() {
        let a = bind_receiver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = a.local_addr().unwrap().port();
        let _b = bind_receiver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
