//! Services in the data path: the stage the data plane calls for frames to a VIP and for
//! frames on their way to a local container ([`Stage`], over `ingress`'s balancer), and the
//! balancer's snapshot of services and tasks, derived from the view ([`specs`]).
//!
//! `overlay` and `ingress` know nothing of each other; this is where they meet.

use std::sync::Arc;
use std::time::Instant;

use ingress::balancer::{Balancer, Verdict};
use ingress::service::{Backend, Health, Spec};

use crate::api::TaskState;
use crate::cluster::View;
use crate::model::Endpoint;

/// Flows the balancer tracks at most, on this node (about 25 MB of tables).
pub const MAX_FLOWS: u32 = 131_072;

/// The balancer as the data plane's stage.
pub struct Stage(pub Arc<Balancer>);

impl overlay::Stage for Stage {
    fn rewrite(
        &self,
        frame: &mut [u8],
        checksum: overlay::stage::Checksum,
        now: Instant,
        reply: &mut [u8],
    ) -> overlay::Verdict {
        match self.0.process(frame, checksum, now, reply) {
            Verdict::Pass => overlay::Verdict::Pass,
            Verdict::Rewritten => overlay::Verdict::Rewritten,
            Verdict::Reply(len) => overlay::Verdict::Reply(len),
            Verdict::Drop => overlay::Verdict::Drop,
        }
    }
}

/// A new balancer, with the cluster's address-to-MAC convention.
pub fn balancer() -> Result<Balancer, ingress::conntrack::Error> {
    Balancer::new(MAX_FLOWS, Default::default(), Endpoint::mac_bytes)
}

/// Every vip-mode service of the view, with its tasks and their health: what the balancer
/// balances over. Sorted, so an unchanged view gives an equal list.
pub fn specs(view: &View) -> Vec<Spec> {
    let mut specs: Vec<Spec> = view
        .services
        .values()
        .filter_map(|service| {
            let vip = service.vip?;
            let backends = view
                .tasks
                .iter()
                .filter(|t| t.service == service.name)
                .map(|t| Backend {
                    addr: t.ip,
                    node: view
                        .members
                        .iter()
                        .find(|m| m.node.id == t.node)
                        .map_or(std::net::Ipv4Addr::UNSPECIFIED, |m| m.node.address),
                    health: match view.task_state(t) {
                        TaskState::Starting => Health::Starting,
                        TaskState::Healthy => Health::Healthy,
                        TaskState::Unhealthy => Health::Unhealthy,
                        TaskState::Down => Health::Down,
                    },
                })
                .collect();
            Some(Spec {
                name: service.name.clone(),
                vip: ingress::Vip(vip.into()),
                backends,
            })
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}
