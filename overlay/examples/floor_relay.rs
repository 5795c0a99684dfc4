//! The least a TAP-and-UDP data plane can do per packet: one thread, level-triggered `poll`,
//! one read and one send per wake-up, no tables, no headers. `scripts/rtt-floor.sh` measures its
//! ping RTT next to the kernel's VXLAN device and overlayd's. With every thread on one CPU
//! (no halted CPU to wake) that is the floor for any userspace relay of this shape that sleeps
//! when idle; left to the scheduler it is only a plain relay, which overlayd's steering beats.
//!
//! Frames travel as bare UDP datagrams to one fixed peer: this is a measuring stick, not a
//! tunnel. Runs until killed.
//!
//!   floor_relay TAP LOCAL_IP PEER_IP     (as root, in the node's namespace)

// One `poll(2)` call: level-triggered readiness without mio's edge-triggered re-reads.
#![allow(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::{env, io, process};

use overlay::tap::Queue;
use overlay::vnet;

const PORT: u16 = 4789;

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let [tap, local, peer] = args.as_slice() else {
        eprintln!("usage: floor_relay TAP LOCAL_IP PEER_IP");
        process::exit(2);
    };
    let parse = |s: &str| -> Ipv4Addr {
        s.parse().unwrap_or_else(|_| {
            eprintln!("not an IPv4 address: {s}");
            process::exit(2)
        })
    };
    if let Err(e) = relay(tap, parse(local), parse(peer)) {
        eprintln!("floor_relay: {e}");
        process::exit(1);
    }
}

fn relay(tap: &str, local: Ipv4Addr, peer: Ipv4Addr) -> io::Result<()> {
    let queue = Queue::open(tap)?;
    let udp = UdpSocket::bind(SocketAddrV4::new(local, PORT))?;
    udp.set_nonblocking(true)?;
    let peer = SocketAddrV4::new(peer, PORT);
    let mut fds = [
        libc::pollfd {
            fd: queue.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: udp.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut buf = vec![0u8; 65_536 + vnet::HEADER_LEN];
    println!("up");
    loop {
        // SAFETY: `fds` is a live array of two pollfd structs; the kernel writes only `revents`.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // A failed read or send loses that frame only, as a cable would.
        if fds[0].revents != 0
            && let Ok(n) = queue.read(&mut buf)
        {
            let _ = udp.send_to(&buf[vnet::HEADER_LEN..n], peer);
        }
        if fds[1].revents != 0
            && let Ok(n) = udp.recv(&mut buf)
        {
            let _ = queue.write_parts(&[0; vnet::HEADER_LEN], &buf[..n]);
        }
    }
}
