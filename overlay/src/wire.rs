//! Frames that leave overlayd through the node's own interfaces instead of the overlay: the
//! replies of connections to published ports, which must come from the node the client
//! reached (see the `ingress` crate's balancer).
//!
//! The kernel hooks of a published port steer a client's packets into the TAP before the
//! node's stack sees them, from the underlay interface or from loopback (a client on the node
//! itself). The replies go back the same way:
//! - to a client elsewhere, as whole Ethernet frames on an `AF_PACKET` socket bound to the
//!   underlay interface. It takes a vnet header (`PACKET_VNET_HDR`), so a TSO super-frame
//!   from a local task leaves whole and the interface segments it. It is bound with protocol
//!   0, so it receives nothing.
//! - to a client on the node (the frame's destination MAC is all zero, as loopback frames'
//!   are), as IP packets on a raw socket, so that the stack routes them as its own output.
//!   Injected into loopback as frames they would be dropped as martians (a local or loopback
//!   source arriving from outside). Loopback's MTU (64 KiB) takes a super-frame whole; its
//!   checksum is completed first.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{ethernet, offload, vnet};

/// The sockets replies leave on.
#[derive(Debug)]
pub struct Wire {
    /// Raw IPv4 (`IPPROTO_RAW`: the header is ours) for clients on the node itself.
    local: OwnedFd,
    /// The interface holding the node's underlay address; none when it has none (a node
    /// bound to 0.0.0.0, as some tests run).
    underlay: Option<OwnedFd>,
}

impl Wire {
    /// Opens the sockets, for clients on this node and on the interface that holds `node`
    /// (needs `CAP_NET_RAW`).
    pub fn open(node: Ipv4Addr) -> io::Result<Wire> {
        // SAFETY: plain socket creation; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let local = unsafe { OwnedFd::from_raw_fd(fd) };
        let underlay = match interface_of(node)? {
            Some(index) => Some(packet_socket(index)?),
            None => None,
        };
        Ok(Wire { local, underlay })
    }

    /// Sends one frame with its vnet header (all zero for a frame with complete checksums):
    /// to the node's own stack if its destination MAC is all zero, else out of the underlay
    /// interface.
    pub fn send(&self, header: &[u8; vnet::HEADER_LEN], frame: &mut [u8]) -> io::Result<()> {
        if frame.get(..6).is_some_and(|mac| mac == [0; 6]) {
            return self.send_local(header, frame);
        }
        let socket = self
            .underlay
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        writev(socket, &[header, frame])
    }

    fn send_local(&self, header: &[u8; vnet::HEADER_LEN], frame: &mut [u8]) -> io::Result<()> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        if let Some(h) = vnet::Header::parse(header)
            && h.needs_csum()
        {
            offload::complete_checksum(
                frame,
                usize::from(h.csum_start),
                usize::from(h.csum_offset),
            )
            .map_err(|_| invalid())?;
        }
        let packet = frame.get(ethernet::HEADER_LEN..).ok_or_else(invalid)?;
        let dst = packet.get(16..20).ok_or_else(invalid)?;
        let dst = SocketAddrV4::new(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]), 0);
        let addr = socket2::SockAddr::from(dst);
        // SAFETY: the buffer and the address are live for the call, which only reads them.
        let sent = unsafe {
            libc::sendto(
                self.local.as_raw_fd(),
                packet.as_ptr() as *const libc::c_void,
                packet.len(),
                0,
                addr.as_ptr() as *const libc::sockaddr,
                addr.len(),
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

fn writev(socket: &OwnedFd, parts: &[&[u8]; 2]) -> io::Result<()> {
    let iov = parts.map(|p| libc::iovec {
        iov_base: p.as_ptr() as *mut libc::c_void,
        iov_len: p.len(),
    });
    // SAFETY: both iovecs describe live buffers that the kernel only reads.
    let sent = unsafe { libc::writev(socket.as_raw_fd(), iov.as_ptr(), 2) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An `AF_PACKET` raw socket that takes a vnet header, bound to interface `index` with
/// protocol 0 (it sends there, and receives nothing).
fn packet_socket(index: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR reads one int through the pointer, which points at `on`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            &on as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: the pointer and length describe `addr`, a sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn interface_index(name: &std::ffi::CStr) -> io::Result<u32> {
    // SAFETY: `name` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// The index of the interface that holds `addr`, if one does (none for 0.0.0.0).
fn interface_of(addr: Ipv4Addr) -> io::Result<Option<u32>> {
    if addr.is_unspecified() {
        return Ok(None);
    }
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*at };
        at = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its type.
        if unsafe { (*entry.ifa_addr).sa_family } != libc::AF_INET as u16 {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
        if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
            // SAFETY: ifa_name is a NUL-terminated string alive until freeifaddrs.
            found = Some(unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }.to_owned());
            break;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found.map(|name| interface_index(&name)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::tests::{Netns, require_root};

    /// A frame sent with a zero destination MAC arrives on loopback as a local packet: a UDP
    /// socket in the namespace receives it.
    #[test]
    fn a_loopback_frame_reaches_the_nodes_own_sockets() {
        require_root();
        let ns = Netns::new("wire");
        ns.ip("link set lo up");
        ns.run_inside(|| {
            let wire = Wire::open(Ipv4Addr::UNSPECIFIED).unwrap();
            let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            server
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let port = server.local_addr().unwrap().port();
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2([0; 6], [0; 6])
                .ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
                .udp(40000, port)
                .write(&mut frame, b"hello")
                .unwrap();
            wire.send(&[0; vnet::HEADER_LEN], &mut frame).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from.port()), (&b"hello"[..], 40000));
            assert!(
                wire.send(&[0; vnet::HEADER_LEN], &mut [2; 60]).is_err(),
                "no underlay interface to send a non-loopback frame on"
            );
        });
    }
}
