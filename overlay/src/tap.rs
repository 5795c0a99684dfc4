//! The TAP device: open queues of a multi-queue TAP with a virtio-net header, set offloads.
//!
//! Its `unsafe` is four `ioctl`s on `/dev/net/tun`. Reads and writes go through
//! [`std::fs::File`], which is safe. It does not name, address or enslave the device: the
//! daemon does.
//!
//! Why not the `tun-tap` crate: it opens a single queue without `IFF_VNET_HDR`, so it can
//! neither spread a device over one queue per worker (`IFF_MULTI_QUEUE`) nor carry the
//! virtio-net header that TSO/GSO super-frames need. Those two flags are the whole point.
//!
//! Every queue is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE` and is
//! non-blocking. Each read returns a [`crate::vnet::HEADER_LEN`]-byte virtio-net header
//! followed by the Ethernet frame; each write must start with one. The device disappears
//! when its last queue is closed.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Offload flags for [`Queue::set_offload`] (`TUN_F_*` in `linux/if_tun.h`).
pub mod offload {
    /// The kernel may hand us frames with a partial checksum (and accepts ours).
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    pub const USO4: u32 = libc::TUN_F_USO4;
    pub const USO6: u32 = libc::TUN_F_USO6;
}

/// Longest interface name, without the terminating NUL.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// `struct ifreq` as TUNSETIFF reads it: name, then `short ifr_flags`, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue (file descriptor) of a TAP device.
#[derive(Debug)]
pub struct Queue {
    file: File,
}

impl Queue {
    /// Opens one queue of the multi-queue TAP `name`, creating the device if it does not
    /// exist. Fails with `InvalidInput` for a bad name; on failure no queue is attached.
    pub fn open(name: &str) -> io::Result<Queue> {
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name
                .bytes()
                .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
            as libc::c_short;
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a live, correctly laid
        // out `struct ifreq` that the kernel only reads and writes within its 40 bytes.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr_len: libc::c_int = crate::vnet::HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points at `hdr_len`.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Queue { file })
    }

    /// Opens `count` queues of `name`. Either all are opened or none is kept.
    pub fn open_many(name: &str, count: usize) -> io::Result<Vec<Queue>> {
        (0..count).map(|_| Queue::open(name)).collect()
    }

    /// Tells the kernel which offloads we accept on frames it gives us (`TUNSETOFFLOAD`).
    /// The setting is per device; on error the previous setting stays.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sets the device's queue-selection program (`TUNSETSTEERINGEBPF`): a loaded eBPF
    /// socket-filter program whose return value, modulo the queues, picks the queue for each
    /// frame the kernel sends out of the TAP; `None` goes back to tun's flow hashing. The
    /// setting is per device; the device keeps its own reference to the program.
    pub fn set_steering(&self, program: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fd: libc::c_int = program.map_or(-1, |p| p.as_raw_fd());
        // SAFETY: TUNSETSTEERINGEBPF reads one `int` (a program's descriptor, or -1) through
        // the pointer, which points at `fd`.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETSTEERINGEBPF,
                &fd as *const libc::c_int,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one vnet header + frame. `WouldBlock` when the queue is empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one vnet header + frame, in one piece.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    /// Writes one vnet header and one frame as a single packet.
    pub fn write_parts(&self, header: &[u8], frame: &[u8]) -> io::Result<usize> {
        (&self.file).write_vectored(&[io::IoSlice::new(header), io::IoSlice::new(frame)])
    }
}

impl AsFd for Queue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Which offloads this kernel accepts, probed on a queue (the device keeps the last setting).
///
/// Tries CSUM|TSO4|TSO6|TSO_ECN + USO4|USO6, then without USO, then without TSO_ECN, then
/// CSUM alone, then nothing. Returns the flags that were accepted and are now set.
pub fn probe_offload(queue: &Queue) -> u32 {
    use offload::*;
    let candidates = [
        CSUM | TSO4 | TSO6 | TSO_ECN | USO4 | USO6,
        CSUM | TSO4 | TSO6 | TSO_ECN,
        CSUM | TSO4 | TSO6,
        CSUM,
    ];
    for flags in candidates {
        if queue.set_offload(flags).is_ok() {
            return flags;
        }
    }
    let _ = queue.set_offload(0);
    0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    pub fn require_root() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root (CI runs these tests as root)"
        );
    }

    /// A fresh network namespace, removed on drop (also when the test fails).
    pub struct Netns {
        pub name: String,
    }

    impl Netns {
        pub fn new(tag: &str) -> Netns {
            // Same shape as the harness (ovt-WORD-PID-...), so scripts/lib.sh reaps leftovers of killed runs.
            let name = format!("ovt-{tag}-{}-ns", std::process::id());
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("running ip")
                .success();
            assert!(ok, "ip netns add {name}");
            Netns { name }
        }

        /// Runs `f` on a thread of its own inside this namespace, and waits for it (a panic in
        /// `f` fails the caller).
        pub fn run_inside(&self, f: impl FnOnce() + Send) {
            std::thread::scope(|s| {
                s.spawn(|| {
                    self.enter();
                    f()
                });
            });
        }

        /// Moves the calling thread into this namespace (use a dedicated thread).
        pub fn enter(&self) {
            let f = File::open(format!("/var/run/netns/{}", self.name)).expect("opening netns");
            // SAFETY: `f` is an open netns file; setns only changes the calling thread's namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
        }

        pub fn ip(&self, args: &str) {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", &self.name]).args(args.split_whitespace());
            let out = cmd.output().expect("running ip");
            assert!(
                out.status.success(),
                "ip -n {} {args}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b"] {
            assert_eq!(
                Queue::open(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    /// Needs root: opens a TAP in a fresh netns, writes an ARP request for the address the
    /// kernel owns, and reads the kernel's ARP reply back, with vnet headers both ways.
    #[test]
    fn tap_round_trips_a_frame_in_a_netns() {
        require_root();
        let ns = Netns::new("tap");
        ns.run_inside(|| {
            let queues = Queue::open_many("ovt0", 2).expect("creating TAP ovt0");
            let accepted = probe_offload(&queues[0]);
            assert_ne!(accepted & offload::CSUM, 0, "kernel refused TUN_F_CSUM");
            ns.ip("link set ovt0 address 02:00:c6:13:ff:01 up");
            ns.ip("addr add 198.19.255.1/24 dev ovt0");

            let me = crate::Mac([0x02, 0, 0xc6, 0x13, 0xff, 0x02]);
            let mut frame = [0u8; crate::arp::REPLY_FRAME_LEN];
            crate::arp::emit_request(
                (me, std::net::Ipv4Addr::new(198, 19, 255, 2)),
                std::net::Ipv4Addr::new(198, 19, 255, 1),
                &mut frame,
            );
            let n = queues[0]
                .write_parts(&[0u8; crate::vnet::HEADER_LEN], &frame)
                .expect("writing TAP");
            assert_eq!(n, crate::vnet::HEADER_LEN + frame.len());

            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            loop {
                assert!(Instant::now() < deadline, "no ARP reply from the kernel");
                // The reply may come out of any queue.
                for q in &queues {
                    let Ok(n) = q.read(&mut buf) else { continue };
                    let (hdr, body) = buf[..n].split_at(crate::vnet::HEADER_LEN);
                    let eth = crate::ethernet::Frame::new_checked(body).unwrap();
                    if eth.dst() != me || eth.ethertype() != crate::ethernet::ethertype::ARP {
                        continue;
                    }
                    assert_eq!(
                        hdr,
                        &[0u8; crate::vnet::HEADER_LEN][..],
                        "ARP reply needs no offload"
                    );
                    let arp = crate::arp::Packet::new_checked(eth.payload()).unwrap();
                    assert_eq!(arp.operation(), crate::arp::Operation::Reply);
                    assert_eq!(arp.sender_ip(), std::net::Ipv4Addr::new(198, 19, 255, 1));
                    assert_eq!(
                        arp.sender_mac(),
                        crate::Mac([0x02, 0, 0xc6, 0x13, 0xff, 0x01])
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
}
