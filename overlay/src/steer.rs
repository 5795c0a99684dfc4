//! The system calls behind the steered layout (see `governor` for when it is used): pin a
//! worker to its CPU, and have the kernel hand worker `i` the packets that CPU `i` sends into
//! a TAP or receives from the underlay.
//!
//! - [`pin_current_thread`] / [`unpin_current_thread`]: `sched_setaffinity`;
//! - [`attach_tap`] / [`detach_tap`]: a two-instruction eBPF program, "return the current
//!   CPU", set as the TAP's queue selector ([`Queue::set_steering`]; tun takes the value
//!   modulo its queues, and worker `i` serves queue `i`); detached, tun hashes flows to
//!   queues again;
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
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

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

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
struct BpfInsn {
    code: u8,
    /// dst register in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The prefix of `union bpf_attr` that `BPF_PROG_LOAD` reads; the kernel treats the missing
/// tail as zero.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// Opcodes `BPF_JMP | BPF_CALL` and `BPF_JMP | BPF_EXIT`.
const BPF_CALL: u8 = 0x85;
const BPF_EXIT: u8 = 0x95;
const BPF_FUNC_GET_SMP_PROCESSOR_ID: i32 = 8;

/// Whether this kernel and these privileges allow steering: the governor can read how busy a
/// thread is, the TAP program loads, and the socket group's program attaches (on `socket`, of
/// a group of `sockets`) and detaches again. Nothing stays attached.
pub fn probe(socket: &impl AsRawFd, sockets: u32) -> io::Result<()> {
    thread_demand(current_thread_id())?;
    load_tap_program()?;
    attach_reuseport(socket, sockets)?;
    detach_reuseport(socket)
}

/// Makes the TAP that `queue` belongs to queue each frame for the worker of the CPU that
/// sends it. The setting is per device and lasts until [`detach_tap`] or the device goes.
pub fn attach_tap(queue: &Queue) -> io::Result<()> {
    // The device keeps its own reference, so the program's descriptor is closed on return.
    queue.set_steering(Some(load_tap_program()?.as_fd()))
}

/// Lets the TAP hash flows to queues again.
pub fn detach_tap(queue: &Queue) -> io::Result<()> {
    queue.set_steering(None)
}

/// Loads "return the current CPU" as a socket-filter program, the type tun runs for queue
/// selection.
fn load_tap_program() -> io::Result<OwnedFd> {
    let insn = |code, imm| BpfInsn {
        code,
        regs: 0,
        off: 0,
        imm,
    };
    let insns = [
        insn(BPF_CALL, BPF_FUNC_GET_SMP_PROCESSOR_ID),
        insn(BPF_EXIT, 0),
    ];
    // The project's own licence: the one helper used is not GPL-only.
    let license = c"Apache-2.0";
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: `attr` is a live BPF_PROG_LOAD attribute whose pointers (instructions, license)
    // outlive the call; the kernel only reads `size_of::<ProgLoad>()` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
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
    // SAFETY: the pointer and length describe `prog`, whose filter array outlives the call;
    // the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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

    /// Needs root: a TAP with two queues in a fresh netns; with the program attached, a
    /// datagram the kernel routes out of the TAP while running on CPU `i` is read from queue
    /// `i`; detaching is accepted.
    #[test]
    fn tap_program_picks_the_queue_of_the_cpu() {
        require_root();
        if !two_cpus() {
            return;
        }
        let ns = Netns::new("steertap");
        ns.run_inside(|| {
            let queues = Queue::open_many("ovs0", 2).expect("creating TAP ovs0");
            queues[0].set_offload(0).unwrap();
            ns.ip("link set ovs0 up");
            ns.ip("addr add 198.19.254.1/24 dev ovs0");
            ns.ip("neigh add 198.19.254.2 lladdr 02:00:c6:13:fe:02 dev ovs0 nud permanent");
            attach_tap(&queues[0]).expect("kernel refused the TAP steering program");
            let client = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let to = SocketAddrV4::new(Ipv4Addr::new(198, 19, 254, 2), 9);
            each_cpu_gets_its_own(
                |marker| client.send_to(marker, to).map(drop),
                |i, buf| queues[i].read(buf),
            );
            detach_tap(&queues[0]).expect("detaching");
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
