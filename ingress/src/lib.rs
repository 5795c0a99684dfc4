//! Services: everything the routing mesh does with a flow once the overlay has delivered it.
//!
//! This crate will own the service table (VIP, published ports, tasks, health), backend choice by
//! consistent hashing (Maglev-style, so every node picks the same task for a flow), connection
//! tracking and NAT rewrite of IPv4/IPv6 + TCP/UDP with incremental checksums, published ports on
//! every node, health checks and DNS answers (`web` -> VIP, `tasks.web` -> task addresses).
//!
//! It knows nothing of VXLAN, TAPs or sockets: like `overlay`'s packet logic it is sans-IO, and
//! the `overlayd` binary connects the two. Both read packets through the `packet` crate's views.
//!
//! # Layout
//!
//! - [`nat`]: address and port rewrites of an Ethernet + IPv4 + TCP/UDP frame with incremental
//!   checksums (full, or the partial sum of an offloaded frame), and the [`nat::Flow`] 5-tuple.
#![forbid(unsafe_code)]

use std::net::IpAddr;

pub mod nat;

/// A service's virtual IP: the address clients use, rewritten to a task's address by NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip(pub IpAddr);

/// Transport protocol of a published port or a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}
