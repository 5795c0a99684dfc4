//! Services: everything the routing mesh does with a flow once the overlay has delivered it.
//!
//! This crate owns the service table (VIPs, tasks, their health), backend choice by Maglev
//! consistent hashing (so every node picks the same task for a flow), connection tracking and
//! DNS answers, NAT rewrite, for VIPs and for ports published on the nodes (the routing mesh).
//!
//! It knows nothing of VXLAN, TAPs or sockets, and does not read the clock: like `overlay`'s
//! packet logic it is sans-IO, time is passed in, and the `overlayd` binary connects the two.
//! It reads and rewrites packets only through the `packet` crate's views.
//!
//! # Layout
//!
//! A flow to a VIP meets the modules in this order. [`service`] is the snapshot the control
//! plane builds and swaps in whole: it finds the service of a destination address (a VIP
//! balances every port and both protocols to the same port on a task) and keeps, besides all
//! of the service's tasks, a table of its healthy ones. That table is a [`maglev`] lookup
//! table: built from a set of backends, independent of their order, it maps a flow hash to a
//! backend in one step and moves about 1/N of the flows when one of N backends goes. The
//! flow hash is [`flow::Tuple::stable_hash`], over the tuple the client sent, computed with
//! the crate's one stable hash (`hash`) so that every node gets the same value.
//!
//! Once a task is chosen, [`conntrack`] remembers it: a table of NATed flows that every worker
//! reads without a lock, each flow under both its original and its reply tuple so that either
//! direction finds it; only a flow's events (its start, a change of state, its end) lock it. It runs per-state TCP and UDP timeouts through `poll_timeout` and
//! `handle_timeout`, has a capacity fixed (and allocated) when it is built, evicts embryonic
//! flows first when full, and marks the flows of a removed task so that they can be reset.
//! [`service::Table::removed_backends`] says which tasks those are when a snapshot replaces
//! another.
//!
//! A node whose table a restart emptied picks its flows up mid-stream: [`rederive`] matches a
//! task's packet to the VIP flow it answers by the same hashing.
//!
//! [`nat`] rewrites a flow's addresses and ports in an Ethernet + IPv4 + TCP/UDP frame with
//! incremental checksums (full, or the partial sum of an offloaded frame), and reads its
//! 5-tuple.
//!
//! A published port with `proxy=v2` is not NATed: the daemon accepts the client's connection,
//! picks its task as the data path would ([`service::Table::pick_published`]) and writes a
//! [`proxy_protocol`] header to the task before the client's bytes.
//!
//! [`dns`] answers queries for the names of one network (services, `tasks.` names,
//! containers and their aliases) from a snapshot, and says which queries belong upstream.
#![forbid(unsafe_code)]

pub mod balancer;
pub mod conntrack;
pub mod dns;
pub mod flow;
mod hash;
pub mod maglev;
pub mod nat;
pub mod proxy_protocol;
pub mod rederive;
pub mod reject;
pub mod service;

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
