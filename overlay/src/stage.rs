//! The seam for a layer-3 stage between switching and encapsulation: the one place where
//! something other than the switch may look at, and rewrite, a frame.
//!
//! The overlay knows nothing of services. It hands a [`Stage`] the unicast IPv4 frames that
//! matter to one: frames sent to a service address's MAC ([`crate::Location::Service`]),
//! frames about to be delivered to a local endpoint (which may be the replies of flows the
//! stage rewrote), frames the node's own stack steered into the TAP (connections to published
//! ports, [`Origin::Host`]) or sent through its bridge to an endpoint ([`Origin::Bridge`]:
//! the node's own connections to tasks), frames a container sent to the gateway's MAC that were steered to
//! the TAP (replies of those connections), and frames another node forwarded from its own
//! stack ([`Origin::Node`]). The daemon plugs in the load balancer of the `ingress` crate;
//! without one, [`Passthrough`] leaves every frame alone.
//!
//! A stage is called from every worker at once, so it takes `&self`; whatever it keeps per flow
//! must be reachable from any worker (the two directions of a flow may be read by different
//! workers).

use std::net::Ipv4Addr;
use std::time::Instant;

pub use packet::checksum::Mode as Checksum;

/// Where a frame handed to the stage came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The overlay: a container on this node, or one on another node over VXLAN.
    Overlay,
    /// This node's own stack, steered into the TAP by the kernel hooks of published ports.
    Host,
    /// This node's own stack through the network's bridge (the gateway's MAC), to an endpoint
    /// from an address other than the gateway's: the node's own connections to tasks.
    Bridge,
    /// The node at this underlay address, which took a connection from its own stack and
    /// sent it to an endpoint here.
    Node(Ipv4Addr),
}

/// What a stage decided about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not the stage's business: switch the frame as it is.
    Pass,
    /// Rewritten in place (addresses, ports, MACs, checksums): switch it by its new
    /// destination MAC.
    Rewritten,
    /// Answer the sender with the frame of this length, built in the reply buffer (a TCP reset
    /// or an ICMP error for a flow that has nowhere to go).
    Reply(usize),
    /// Count it (as `service`) and forget it.
    Drop,
    /// Rewritten in place for this node's own stack: send it out through the interface its
    /// destination MAC is on (loopback when all zero), not onto the overlay.
    Wire,
    /// Send it, as it is, back to the node at this underlay address.
    Return(Ipv4Addr),
}

pub trait Stage: Send + Sync {
    /// Looks at `frame` (Ethernet, no vnet header) from `origin`, which holds full checksums
    /// or, with [`Checksum::Partial`], the pseudo-header sum of an offloaded frame in its L4
    /// checksum field. A reply goes into `reply` (at least [`crate::switch::REPLY_LEN`] bytes).
    fn rewrite(
        &self,
        frame: &mut [u8],
        checksum: Checksum,
        origin: Origin,
        now: Instant,
        reply: &mut [u8],
    ) -> Verdict;
}

/// No stage: every frame passes.
pub struct Passthrough;

impl Stage for Passthrough {
    fn rewrite(&self, _: &mut [u8], _: Checksum, _: Origin, _: Instant, _: &mut [u8]) -> Verdict {
        Verdict::Pass
    }
}
