//! The frames half of overlayd: a userspace VXLAN switch between one TAP device per
//! overlay network and the underlay UDP socket.
//!
//! It switches frames the local Linux bridge hands to the TAP (to a remote VTEP, answered
//! locally for ARP and IPv6 neighbor solicitations, or flooded to the network's peers) and
//! delivers VXLAN received from peers (RFC 7348, UDP 4789 by default). With [`Config::offloads`] it moves 64 KB
//! super-frames: TSO/USO from the TAP segmented in userspace and sent with `UDP_SEGMENT`,
//! `UDP_GRO` batches decapsulated and their TCP segments (and, where the TAP accepts USO, UDP
//! datagrams) coalesced into one TAP write.
//!
//! It knows nothing of services, gossip or the cluster: the daemon publishes [`Tables`], reads
//! [`Stats`], and may plug in a [`Stage`] that rewrites frames to service addresses. It does not configure links (bridge, MTU, addresses): the daemon does.
//!
//! # Layout
//!
//! The packet logic is pure and sans-IO; the drivers are thin.
//!
//! - [`ethernet`], [`vxlan`], [`arp`], [`nd`], [`vnet`]: views over wire bytes (`new_checked`) and
//!   plain values that emit them. Offsets are in one place per header and cite their spec.
//! - [`fdb`]: the per-network indexes built once per published [`Tables`], and the
//!   per-worker table of MACs learned behind peers that are not in cluster state.
//! - [`switch`]: the decision for a frame from the TAP (a [`switch::Forward`] value) or a
//!   datagram from a VTEP (the VNI to deliver it to); drops carry a [`switch::DropReason`].
//! - [`stage`]: the seam where a layer-3 stage (the daemon's load balancer) sees and rewrites
//!   unicast frames to service addresses and to local endpoints, inside the switch decision.
//! - [`port_filter`]: the classic BPF program the daemon attaches to each container's bridge
//!   port, so a container sends only from its own MAC and addresses.
//! - [`seal`]: the sealed datagrams of encrypted networks (ChaCha20-Poly1305 in place, the
//!   replay window); [`keyring`]: the sessions per network and peer built from the keys the
//!   daemon publishes, kept across publishes and key rotations.
//! - [`flowhash`]: the inner-flow hash that picks the send socket, so the outer UDP source port.
//! - [`offload`] (with `packet::checksum`): splitting super-frames into wire-sized segments with valid
//!   checksums, and coalescing received TCP segments (or UDP datagrams) back into one
//!   super-frame.
//! - [`tap`]: the multi-queue TAP with a virtio-net header.
//! - [`udp`]: the receive sockets (one per worker, `SO_REUSEPORT`, read with `recvmmsg`), the
//!   send-socket pool, and `UDP_SEGMENT`/`UDP_GRO`.
//! - `worker`: one thread per TAP queue; polls, switches and does the I/O, without locks or
//!   allocation per packet; `batch`: the datagrams it gathers into full `UDP_SEGMENT` sends.
//! - `governor`: the choice between pinning workers to CPUs with packets steered to the
//!   worker of their CPU (light load: short round trips) and letting them spread (heavy
//!   load: throughput); `steer`: the system calls behind it (affinity, an eBPF program for
//!   the TAP that keeps busy bulk flows on their worker, a classic BPF program for the
//!   `SO_REUSEPORT` group); `bpf`: encoding, loading and the map for the eBPF one.
//! - [`DataPlane`]: starts workers and the governor, adds and removes networks, publishes
//!   tables, sums stats.
//!
//! `unsafe` is confined to four places, each with a `// SAFETY:` line per block: [`tap`]'s
//! ioctls, `udp`'s `sys` module (`setsockopt`, `sendmsg`/`recvmmsg` with control messages),
//! `steer` (affinity, attaching the sockets' classic BPF program) and `bpf` (the `bpf(2)`
//! calls). The checksum's AVX2 call lives in the `packet` crate with the checksum.

pub mod arp;
mod batch;
mod bpf;
/// The Internet checksum lives with the packet views every crate shares.
pub(crate) use packet::checksum;
mod dataplane;
pub mod ethernet;
pub mod fdb;
pub mod flowhash;
mod governor;
pub mod keyring;
pub mod nd;
pub mod offload;
pub mod port_filter;
pub mod seal;
pub mod stage;
mod steer;
pub mod switch;
pub mod tap;
mod traffic;
pub mod udp;
pub mod vnet;
pub mod vxlan;
pub mod wire;
mod worker;

pub use dataplane::{Config, DataPlane, Endpoint, Error, Location, NetworkTable, Stats, Tables};
pub use ethernet::Mac;
pub use keyring::{PeerKeys, Sealing};
pub use stage::{Origin, Stage, Verdict};
pub use traffic::{NetworkTraffic, PeerTraffic};
pub use vxlan::Vni;
