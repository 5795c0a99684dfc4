//! The frames half of overlayd: a userspace VXLAN switch between one TAP device per
//! overlay network and the underlay UDP socket.
//!
//! It switches frames the local Linux bridge hands to the TAP (to a remote VTEP, answered
//! locally for ARP, or flooded to the network's peers) and delivers VXLAN received from
//! peers (RFC 7348, UDP 4789 by default). It knows nothing of services, gossip or the
//! cluster: the daemon publishes [`Tables`] and reads [`Stats`].
//!
//! # Layout
//!
//! The packet logic is pure and sans-IO; the drivers are thin.
//!
//! - [`ethernet`], [`vxlan`], [`arp`], [`vnet`]: views over wire bytes (`new_checked`) and
//!   plain values that emit them. Offsets are in one place per header and cite their spec.
//! - [`fdb`]: the per-network indexes built once per published [`Tables`], and the
//!   per-worker table of MACs learned behind peers that are not in cluster state.
//! - [`switch`]: the decision for a frame from the TAP or a datagram from a VTEP, returned
//!   as a [`switch::Forward`] value; drops carry a [`switch::DropReason`].
//! - [`flowhash`]: the inner-flow hash behind the outer UDP source port.
//! - [`tap`]: the multi-queue TAP with a virtio-net header (the only `unsafe`: its ioctls).
//! - [`udp`]: the receive sockets (one per worker, `SO_REUSEPORT`) and the send-socket pool.
//! - `worker`: one thread per TAP queue; polls, switches and does the I/O.
//! - [`DataPlane`]: starts workers, adds and removes networks, publishes tables, sums stats.

pub mod arp;
mod dataplane;
pub mod ethernet;
pub mod fdb;
pub mod flowhash;
pub mod switch;
pub mod tap;
pub mod udp;
pub mod vnet;
pub mod vxlan;
mod worker;

pub use dataplane::{Config, DataPlane, Endpoint, Error, Location, NetworkTable, Stats, Tables};
pub use ethernet::Mac;
pub use vxlan::Vni;
