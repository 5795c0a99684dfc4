//! The system calls behind the steered layout (see `governor` for when it is used): pin a
//! worker to its CPU, and have the kernel hand worker `i` the packets that CPU `i` sends into
//! a TAP or receives from the underlay.
//!
//! - [`pin_current_thread`] / [`unpin_current_thread`]: `sched_setaffinity`;
//! - [`attach_tap`] / [`detach_tap`]: an eBPF program, "the current CPU, unless the frame
//!   belongs to a bulk flow busy in the last millisecond: then that flow's CPU", as the
//!   TAP's queue selector ([`Queue::set_steering`]; tun takes the value modulo its queues,
//!   and worker `i` serves queue `i`); detached, tun hashes flows to queues again;
//! - [`attach_reuseport`] / [`detach_reuseport`]: a classic BPF program, "current CPU modulo
//!   the workers", on the `SO_REUSEPORT` group of the workers' VXLAN sockets (indexed in bind
//!   order, worker `i` bound `i`-th); detached, the kernel hashes flows to sockets again;
//! - [`thread_demand`]: how long a worker has run or waited to run, for the governor.
//!
//! Steering is only possible when this process may run on exactly CPUs `0..n` and there are
//! `n` workers, so that CPU number and worker index are the same ([`identity_cpus`]), and
//! when the kernel lets this process load and attach both programs and read schedstat
//! ([`probe`]; the programs need `CAP_BPF` or `CAP_SYS_ADMIN`).
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::bpf;
use crate::tap::Queue;

/// A CPU mask as `sched_{get,set}affinity` take it: 1024 bits.
type CpuMask = [u64; 16];

/// The number of CPUs `n` if this process may run on exactly CPUs `0..n`, that is when
/// worker index and CPU number can be the same; `None` otherwise.
pub fn identity_cpus() -> Option<usize> {
    let mut mask: CpuMask = [0; 16];
    // SAFETY: the pointer and size describe `mask`, which the kernel fills; pid 0 is this
    // thread.
    let rc = unsafe {
        libc::sched_getaffinity(
            0,
            size_of::<CpuMask>(),
            mask.as_mut_ptr() as *mut libc::cpu_set_t,
        )
    };
    if rc != 0 {
        return None;
    }
    contiguous_from_zero(&mask)
}

/// `n` if exactly bits `0..n` are set (n ≥ 1).
fn contiguous_from_zero(mask: &CpuMask) -> Option<usize> {
    let n: usize = mask.iter().map(|w| w.count_ones() as usize).sum();
    let expected = (0..mask.len() * 64).map(|c| c < n);
    let actual = (0..mask.len() * 64).map(|c| mask[c / 64] >> (c % 64) & 1 == 1);
    (n > 0 && expected.eq(actual)).then_some(n)
}

/// Restricts the calling thread to CPU `cpu` (below 1024).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let mut mask: CpuMask = [0; 16];
    *mask
        .get_mut(cpu / 64)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))? |= 1 << (cpu % 64);
    set_affinity(&mask)
}

/// Lets the calling thread run on CPUs `0..cpus` again (what [`identity_cpus`] found).
pub fn unpin_current_thread(cpus: usize) -> io::Result<()> {
    let mut mask: CpuMask = [0; 16];
    for cpu in 0..cpus.min(mask.len() * 64) {
        mask[cpu / 64] |= 1 << (cpu % 64);
    }
    set_affinity(&mask)
}

fn set_affinity(mask: &CpuMask) -> io::Result<()> {
    // SAFETY: the pointer and size describe `mask`, which the kernel only reads; pid 0 is the
    // calling thread.
    let rc = unsafe {
        libc::sched_setaffinity(
            0,
            size_of::<CpuMask>(),
            mask.as_ptr() as *const libc::cpu_set_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's id, for [`thread_demand`].
pub fn current_thread_id() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// How long thread `tid` of this process has been on a CPU or waiting for one: the first two
/// fields of `/proc/self/task/<tid>/schedstat` (nanoseconds). Waiting counts because a
/// pinned worker that shares its CPU with a busy application gets only part of it.
pub fn thread_demand(tid: libc::pid_t) -> io::Result<std::time::Duration> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    match (fields.next().flatten(), fields.next().flatten()) {
        (Some(run), Some(wait)) => Ok(std::time::Duration::from_nanos(run + wait)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unreadable schedstat",
        )),
    }
}

/// A bulk flow keeps its queue until it has sent nothing for this long; then its next frame
/// goes to the queue of the CPU that sends it. By then the worker that had the flow has
/// normally sent what it read, so the move does not reorder the flow.
const STICKY_NS: u32 = 1_000_000;
/// Flows remembered per TAP (least recently used forgotten first).
const STICKY_FLOWS: u32 = 4096;
/// `offsetof(struct __sk_buff, hash)`: the flow hash TCP and connected UDP sockets put on
/// their packets (0 when none was set).
const SKB_HASH: i16 = 68;
/// `offsetof(struct __sk_buff, gso_segs)`: more than 1 for a TSO/USO super-frame.
const SKB_GSO_SEGS: i16 = 164;

/// Whether this kernel and these privileges allow steering: the governor can read how busy a
/// thread is, the TAP program loads, and the socket group's program attaches (on `socket`, of
/// a group of `sockets`) and detaches again. Nothing stays attached; the loaded TAP program is
/// returned for [`attach_tap`].
pub fn probe(socket: &impl AsRawFd, sockets: u32) -> io::Result<TapProgram> {
    thread_demand(current_thread_id())?;
    let program = TapProgram::load(STICKY_NS)?;
    attach_reuseport(socket, sockets)?;
    detach_reuseport(socket)?;
    Ok(program)
}

/// The TAP's queue selector (see [`TapProgram::load`]), loaded once and attached to every TAP
/// while steered; the TAPs share it and its flow map (a flow hash is unique enough across them).
#[derive(Debug)]
pub struct TapProgram(OwnedFd);

/// Makes the TAP that `queue` belongs to queue each frame for the worker of the CPU that sends
/// it, except that a bulk flow stays with its worker while it is busy (see [`TapProgram`]).
/// The setting is per device and lasts until [`detach_tap`] or the device goes.
pub fn attach_tap(queue: &Queue, program: &TapProgram) -> io::Result<()> {
    queue.set_steering(Some(program.0.as_fd()))
}

/// Lets the TAP hash flows to queues again.
pub fn detach_tap(queue: &Queue) -> io::Result<()> {
    queue.set_steering(None)
}

impl TapProgram {
    /// Loads the TAP's queue selector, a socket-filter program (the type tun runs for it) that
    /// returns a CPU number, over a map of its own (flow hash -> CPU, time of the flow's last
    /// frame) that every TAP it is attached to shares:
    ///
    /// ```text
    ///     if the frame has no flow hash: return the current CPU
    ///     if the flow is remembered and sent a frame less than `sticky_ns` ago:
    ///         note the time, return the flow's CPU
    ///     if the frame is a super-frame: remember (current CPU, now) for the flow
    ///     return the current CPU
    /// ```
    ///
    /// Following the current CPU alone splits a bulk flow across two workers whenever its sender
    /// migrates, and the two then race each other's frames out of order: thousands of spurious
    /// TCP retransmissions at the start of an iperf3 run, hundreds per second at 2 Gbit/s. Only
    /// super-frames make a flow sticky, so a request/response flow of small messages keeps
    /// meeting the worker of its sender's CPU (with one request in flight it cannot be reordered).
    fn load(sticky_ns: u32) -> io::Result<TapProgram> {
        use bpf::asm::*;
        // u32 flow hash -> (u32 CPU, u32 padding, u64 time of the last frame in ns).
        let map = bpf::create_lru_hash(4, 16, STICKY_FLOWS)?;
        let map_fd = map.as_raw_fd();
        let [map_lo, map_hi] = load_map(1, map_fd);
        // r6 ctx, r7 flow hash (the key, also at fp-4), r8 map value or CPU, r9 now.
        // The new value is built at fp-24: CPU (u32), padding (u32), time (u64).
        let insns = [
            mov(6, 1),
            load32(7, 6, SKB_HASH),
            jeq_imm(7, 0, 34), // -> no hash
            store32(10, -4, 7),
            map_lo,
            map_hi,
            mov(2, 10),
            add_imm(2, -4),
            call(MAP_LOOKUP_ELEM),
            mov(8, 0),
            call(KTIME_GET_NS),
            mov(9, 0),
            jeq_imm(8, 0, 7), // -> current CPU
            load64(1, 8, 8),
            mov(2, 9),
            sub(2, 1),
            // Signed: another CPU may have stored a time later than ours (a flow's frames can
            // reach the TAP from two CPUs at once); that flow is busy, not quiet.
            jsgt_imm(2, sticky_ns.min(i32::MAX as u32) as i32, 3), // -> current CPU
            store64(8, 8, 9),
            load32(0, 8, 0),
            exit(),
            // current CPU:
            call(GET_SMP_PROCESSOR_ID),
            mov(8, 0),
            load32(1, 6, SKB_GSO_SEGS),
            jle_imm(1, 1, 11), // -> return it
            store32(10, -24, 8),
            store32_imm(10, -20, 0),
            store64(10, -16, 9),
            map_lo,
            map_hi,
            mov(2, 10),
            add_imm(2, -4),
            mov(3, 10),
            add_imm(3, -24),
            mov_imm(4, 0), // BPF_ANY
            call(MAP_UPDATE_ELEM),
            // return it:
            mov(0, 8),
            exit(),
            // no hash:
            call(GET_SMP_PROCESSOR_ID),
            exit(),
        ];
        // The program holds the map now; `map` (our descriptor) closes on return.
        bpf::load_socket_filter(&insns).map(TapProgram)
    }
}

/// Makes the `SO_REUSEPORT` group that `socket` belongs to deliver each datagram received
/// on CPU `i` to the socket at index `i % sockets`. The program is per group and lasts until
/// [`detach_reuseport`].
pub fn attach_reuseport(socket: &impl AsRawFd, sockets: u32) -> io::Result<()> {
    let op = |code: u32, k| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut filter = [
        // A = current CPU
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        ),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, sockets.max(1)),
        op(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: SO_ATTACH_REUSEPORT_CBPF takes a sock_fprog, and its filter array outlives the
    // call; the kernel copies the program.
    unsafe {
        crate::udp::set_option(
            socket,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog,
        )
    }
}

/// Lets the kernel hash datagrams to the group's sockets again.
pub fn detach_reuseport(socket: &impl AsRawFd) -> io::Result<()> {
    // The kernel ignores the value.
    crate::udp::set_int(socket, libc::SOL_SOCKET, libc::SO_DETACH_REUSEPORT_BPF, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::tests::{Netns, require_root};
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    use std::time::{Duration, Instant};

    /// The steering tests need two CPUs to tell "steered" from "hashed".
    fn two_cpus() -> bool {
        let n = identity_cpus().unwrap_or(1);
        if n < 2 {
            eprintln!("skipped: needs CPUs 0 and 1, this process may use {n}");
        }
        n >= 2
    }

    /// Waits (bounded) until one of `read`'s sources yields `marker`; returns which one.
    fn which_gets(
        marker: &[u8],
        sources: usize,
        mut read: impl FnMut(usize, &mut [u8]) -> std::io::Result<usize>,
    ) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65_536];
        loop {
            assert!(Instant::now() < deadline, "{marker:?} never arrived");
            for i in 0..sources {
                while let Ok(n) = read(i, &mut buf) {
                    if buf[..n].windows(marker.len()).any(|w| w == marker) {
                        return i;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// For a few rounds, on CPU 0 then CPU 1: pins the calling thread there, has `send` send
    /// a fresh marker, and asserts that source `i` of `read` (0 or 1) is the one that gets it.
    /// Leaves the thread unpinned.
    fn each_cpu_gets_its_own(
        send: impl Fn(&[u8]) -> std::io::Result<()>,
        mut read: impl FnMut(usize, &mut [u8]) -> std::io::Result<usize>,
    ) {
        for round in 0..4u8 {
            for cpu in 0..2usize {
                pin_current_thread(cpu).unwrap();
                let marker = [0xa5, round, cpu as u8, 0x5a];
                send(&marker).unwrap();
                let got = which_gets(&marker, 2, &mut read);
                assert_eq!(got, cpu, "sent on CPU {cpu} (round {round})");
            }
        }
        unpin_current_thread(2).unwrap();
    }

    /// Clears `CAP_SYS_ADMIN` and `CAP_BPF` from the calling thread's effective set (threads
    /// it spawns inherit that), as in a container without them.
    fn drop_bpf_capabilities() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        // linux/capability.h
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_BPF: u32 = 39;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget writes two `Data` (version 3) for this thread; both live here.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
        data[0].effective &= !(1 << CAP_SYS_ADMIN);
        data[1].effective &= !(1 << (CAP_BPF - 32));
        // SAFETY: as above; capset only reads them.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
    }

    /// Needs root: with one worker per CPU the data plane is steered; started from a thread
    /// without `CAP_SYS_ADMIN`/`CAP_BPF`, the probe sees the refusal and it stays hashed.
    #[test]
    fn data_plane_is_steered_only_where_the_programs_load() {
        require_root();
        let Some(cpus) = identity_cpus() else {
            eprintln!("skipped: this process may not use exactly CPUs 0..n");
            return;
        };
        let ns = Netns::new("steercap");
        ns.run_inside(|| {
            ns.ip("link set lo up");
            let config = crate::Config {
                local_vtep: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                workers: cpus,
                offloads: true,
                ..crate::Config::default()
            };
            let dp = crate::DataPlane::start(config.clone()).unwrap();
            assert_eq!(dp.stats().layout, "steered", "idle and privileged");
            dp.shutdown();
            drop_bpf_capabilities();
            let dp = crate::DataPlane::start(config).unwrap();
            assert_eq!(dp.stats().layout, "hashed", "the programs cannot load");
            dp.shutdown();
        });
    }

    /// Needs root: two sockets in one `SO_REUSEPORT` group in a fresh netns; with the program
    /// attached, a datagram sent (and so received, over loopback) on CPU `i` reaches socket
    /// `i`, for both CPUs and several rounds; detaching is accepted.
    #[test]
    fn reuseport_program_picks_the_socket_of_the_cpu() {
        require_root();
        if !two_cpus() {
            return;
        }
        let ns = Netns::new("steerudp");
        ns.run_inside(|| {
            ns.ip("link set lo up");
            let any = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
            let first = crate::udp::bind_receiver(any).unwrap();
            let std::net::SocketAddr::V4(at) = first.local_addr().unwrap() else {
                unreachable!()
            };
            let group = [first, crate::udp::bind_receiver(at).unwrap()];
            attach_reuseport(&group[0], 2).expect("kernel refused the reuseport program");
            let client = UdpSocket::bind(any).unwrap();
            each_cpu_gets_its_own(
                |marker| client.send_to(marker, at).map(drop),
                |i, buf| group[i].recv(buf),
            );
            detach_reuseport(&group[0]).expect("detaching");
            probe(&group[1], 2).expect("probe on a working group");
        });
    }

    /// Runs `f` in a fresh netns holding TAP `name` with two queues (no offloads), up, with
    /// 198.19.254.1/24 and a permanent neighbour 198.19.254.2, so that datagrams sent to that
    /// address leave through the TAP.
    fn with_two_queue_tap(tag: &str, name: &str, f: impl FnOnce(&[Queue]) + Send) {
        let ns = Netns::new(tag);
        ns.run_inside(|| {
            let queues = Queue::open_many(name, 2).expect("creating a TAP");
            queues[0].set_offload(0).unwrap();
            ns.ip(&format!("link set {name} up"));
            ns.ip(&format!("addr add 198.19.254.1/24 dev {name}"));
            ns.ip(&format!(
                "neigh add 198.19.254.2 lladdr 02:00:c6:13:fe:02 dev {name} nud permanent"
            ));
            f(&queues);
        });
    }

    const BEYOND_TAP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 254, 2), 9);

    /// Needs root: with the program attached, a datagram of an unconnected socket (normally
    /// no flow hash) that the kernel routes out of the TAP while running on CPU `i` is read
    /// from queue `i`; detaching is accepted.
    #[test]
    fn tap_program_picks_the_queue_of_the_cpu() {
        require_root();
        if !two_cpus() {
            return;
        }
        with_two_queue_tap("steertap", "ovs0", |queues| {
            let program = TapProgram::load(STICKY_NS).unwrap();
            attach_tap(&queues[0], &program).expect("kernel refused the TAP steering program");
            let client = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            each_cpu_gets_its_own(
                |marker| client.send_to(marker, BEYOND_TAP).map(drop),
                |i, buf| queues[i].read(buf),
            );
            detach_tap(&queues[0]).expect("detaching");
        });
    }

    /// Needs root: a connected socket's datagrams carry a flow hash. Its small datagrams
    /// follow the sending CPU at once. A `UDP_SEGMENT` super-frame makes the flow bulk: sent
    /// from CPU 0 and then at once from CPU 1, both super-frames (and a small datagram after
    /// them) reach queue 0, so the flow keeps its worker and its frames cannot overtake each
    /// other. After the flow has been quiet for longer than the program's window, it follows
    /// its sender again, until its next super-frame.
    #[test]
    fn tap_program_keeps_a_busy_bulk_flow_on_its_queue() {
        require_root();
        if !two_cpus() {
            return;
        }
        // Wide enough that a busy test machine cannot make the first two sends "quiet".
        let window = Duration::from_millis(300);
        with_two_queue_tap("steerflow", "ovs1", |queues| {
            let program = TapProgram::load(window.as_nanos() as u32).unwrap();
            attach_tap(&queues[0], &program).unwrap();
            let client = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            client.connect(BEYOND_TAP).unwrap();
            let mut read = |i: usize, buf: &mut [u8]| queues[i].read(buf);
            // Three 100-byte datagrams in one send, the marker in the first.
            let mut send_on = |cpu: usize, marker: &[u8], bulk: bool| {
                pin_current_thread(cpu).unwrap();
                if bulk {
                    let mut buf = [0u8; 300];
                    buf[..marker.len()].copy_from_slice(marker);
                    crate::udp::send_gso(&client, &buf, BEYOND_TAP, 100).unwrap();
                } else {
                    client.send(marker).unwrap();
                }
                which_gets(marker, 2, &mut read)
            };
            assert_eq!(send_on(0, b"\xa5small0", false), 0);
            assert_eq!(
                send_on(1, b"\xa5small1", false),
                1,
                "small frames follow the CPU"
            );
            assert_eq!(
                send_on(0, b"\xa5first", true),
                0,
                "a new flow goes to its CPU's queue"
            );
            assert_eq!(send_on(1, b"\xa5second", true), 0, "a busy bulk flow stays");
            assert_eq!(
                send_on(1, b"\xa5small2", false),
                0,
                "also with a small frame"
            );
            std::thread::sleep(window * 2);
            let quiet = "a quiet flow follows its sender";
            assert_eq!(send_on(1, b"\xa5small3", false), 1, "{quiet}");
            assert_eq!(
                send_on(0, b"\xa5third", true),
                0,
                "and is bulk again where it sends"
            );
            assert_eq!(send_on(1, b"\xa5small4", false), 0, "busy once more");
            unpin_current_thread(2).unwrap();
        });
    }

    #[test]
    fn only_cpus_from_zero_map_to_workers() {
        let mut mask: CpuMask = [0; 16];
        assert_eq!(contiguous_from_zero(&mask), None, "no CPU");
        mask[0] = 0b11;
        assert_eq!(contiguous_from_zero(&mask), Some(2));
        mask[0] = 0b110;
        assert_eq!(contiguous_from_zero(&mask), None, "does not start at 0");
        mask[0] = 0b1011;
        assert_eq!(contiguous_from_zero(&mask), None, "a hole");
        mask[0] = u64::MAX;
        mask[1] = 1;
        assert_eq!(contiguous_from_zero(&mask), Some(65));
    }
}
