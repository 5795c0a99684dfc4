//! Services: everything the routing mesh does with a flow once the overlay has delivered it.
//!
//! This crate owns backend choice by consistent hashing (Maglev, so every node picks the same
//! task for a flow). It will also own the service table, connection tracking, NAT rewrite,
//! published ports, health checks and DNS answers.
//!
//! It knows nothing of VXLAN, TAPs or sockets: like `overlay`'s packet logic it is sans-IO, and
//! the `overlayd` binary connects the two.
//!
//! # Layout
//!
//! - [`flow`]: a flow's tuple (protocol and both endpoints) and its stable hash.
//! - [`maglev`]: the Maglev lookup table from a set of backends to slots.
//! - [`conntrack`]: one worker's table of NATed flows, found from either direction, with
//!   per-state timeouts run by `poll_timeout`/`handle_timeout` and a fixed capacity.
//! - `hash`: the one stable hash every node computes alike.
#![forbid(unsafe_code)]

pub mod conntrack;
pub mod flow;
mod hash;
pub mod maglev;

use std::net::IpAddr;

/// A service's virtual IP: the address clients use, rewritten to a task's address by NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip(pub IpAddr);

/// Transport protocol of a published port or a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}
