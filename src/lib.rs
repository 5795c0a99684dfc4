//! `overlayd`: the daemon (`init`, `join`, `run`) and the CLI that talks to it (every other verb).
//!
//! The binary (`src/main.rs`) only parses the command line and starts the daemon or sends one
//! request; everything else is this library, so that the fuzz targets in `fuzz/` reach the
//! parsers of gossip, peer and API input the way the daemon runs them.
//!
//! # Layout
//! - [`cli`]: the verbs and how their replies are printed.
//! - [`cni`]: the CNI plugin's protocol (pure); `src/bin/overlayd-cni.rs` is the plugin.
//! - [`api`]: requests and replies on the local unix socket; [`wire`] frames them.
//! - [`daemon`]: a node's start and stop, its servers, the reconcile loop that makes host and
//!   data plane match the cluster, and containers attached on this node.
//! - [`docker`]: Docker's network and IPAM driver protocols, parsed and answered (pure); the
//!   daemon serves them with `--docker-plugin`.
//! - [`cluster`]: the cluster as derived from gossip (pure); [`model`]: its values and keys.
//! - [`gossip`]: chitchat on a transport signed with the cluster secret ([`token`]).
//! - [`peer`]: authenticated requests between members (join check, proposals, Raft RPCs).
//! - [`registry`]: what must be unique cluster-wide, as a state machine (pure), and
//!   [`consensus`]: Raft that replicates it; [`ipam`]: subnet, VNI and address choices (pure);
//!   [`publish`]: published ports as users write them, and the rules they obey (pure).
//! - `events`: cluster events (members, networks, tasks), one structured log line each.
//! - [`metrics`]: Prometheus text at `--metrics`, read from the counters at scrape time.
//! - [`trace`]: a packet through this node's data path, explained (pure).
//! - [`services`]: the balancer as the data plane's stage, and its snapshot of the view.
//! - [`host`]: bridges and veth pairs via iproute2; [`egress`]: the nftables rules that let
//!   containers out through their node; [`state_dir`]: the node's identity on disk.
//! - `sim` (tests only): N nodes' control planes in one process on a virtual clock and an
//!   in-memory network, to measure convergence at scale.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod cni;
pub mod consensus;
pub mod daemon;
pub mod docker;
mod egress;
mod events;
pub mod gossip;
mod host;
mod http;
mod ipam;
mod mesh_hooks;
pub mod metrics;
pub mod model;
pub mod peer;
pub mod publish;
pub mod registry;
mod services;
#[cfg(test)]
mod sim;
pub mod state_dir;
pub mod token;
pub mod trace;
mod wire;
